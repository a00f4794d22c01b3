"""Reading ComfyUI's API prompt: which Crop To Mask a pasted image came from (issue 18 item 5), normal suite."""

from __future__ import annotations

from max4zero.nodes.prompt_graph import other_crop_problem, upstream_outputs


def _prompt(crop_info_from: str, second_photo: bool = False, both_in_pipeline: bool = False) -> dict:
    """Load Image → two Crop To Mask (torso "2", face "3") → a generation from the torso crop → Paste Back "9"."""
    gen_inputs = {"image": ["2", 0]}
    if both_in_pipeline:
        gen_inputs["reference"] = ["3", 0]
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "person.png"}},
        "8": {"class_type": "LoadImage", "inputs": {"image": "other.png"}},
        "2": {"class_type": "MaX4ZeroCropToMask", "inputs": {"image": ["1", 0], "mask": ["1", 1], "size": 512}},
        "3": {"class_type": "MaX4ZeroCropToMask", "inputs": {"image": ["8" if second_photo else "1", 0],
                                                             "mask": ["1", 1], "size": 256},
              "_meta": {"title": "face crop"}},
        "5": {"class_type": "VAEDecode", "inputs": gen_inputs},
        "9": {"class_type": "MaX4ZeroPasteBack", "inputs": {"original_image": ["1", 0], "generated_image": ["5", 0],
                                                            "crop_info": [crop_info_from, 2], "mask": ["2", 1]}},
    }


def test_the_crop_info_of_the_generated_crop_is_fine():
    assert other_crop_problem(_prompt("2"), "9") is None


def test_another_crop_of_the_same_photo_is_named():
    problem, fix = other_crop_problem(_prompt("3"), "9")
    assert problem.startswith("generated_image was made from the crop of MaX4Zero Crop To Mask (node 2), but crop_info "
                              "comes from face crop (node 3), another crop of the same photo")
    assert fix == "connect the crop_info output of MaX4Zero Crop To Mask (node 2) to crop_info"


def test_nothing_is_said_when_it_cannot_be_told():
    assert other_crop_problem(_prompt("3", second_photo=True), "9") is None  # another photo: the fingerprint's job
    assert other_crop_problem(_prompt("3", both_in_pipeline=True), "9") is None  # both crops made the image
    assert other_crop_problem(None, "9") is None and other_crop_problem(_prompt("3"), None) is None


def test_upstream_outputs_follow_every_link_once():
    p = _prompt("2", both_in_pipeline=True)
    assert upstream_outputs(p, ["5", 0]) == {("5", 0), ("2", 0), ("3", 0), ("1", 0), ("1", 1)}
    p["1"]["inputs"]["loop"] = ["5", 0]  # a cycle does not hang it
    assert ("5", 0) in upstream_outputs(p, ["5", 0])
