"""Registration stage of MaX4Zero: matching, Moving Least Squares warp, fringe masks (plain PyTorch)."""
