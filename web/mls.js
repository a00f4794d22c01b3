// Moving Least Squares in the browser, for the point editor's live preview: the formulas of warping/mls.py
// (Schaefer, McPhail, Warren 2006), evaluated in float64 on a coarse grid and interpolated bilinearly, so the
// preview follows the mouse; the exact warp still runs in Python when the workflow is queued.
// A test (tests/comfyui/test_point_editor_browser.py) runs these functions in the real browser and compares
// the maps with warping/mls.py on the same points. Coordinates are pixel (x, y), pixel centres at integers.
// No DOM, no ComfyUI: a plain module.

export const KINDS = ["affine", "similarity", "rigid"];
const EPS = 2.220446049250313e-16;

/**
 * MLS map taking control points src[k] = [x, y] to dst[k], evaluated at (vx, vy); returns [x, y].
 * Weights w = 1 / |p - v|^(2 alpha). Degenerate cases as in warping/mls.py: a point on control points maps
 * to the mean of their dst; coinciding sources translate; a singular affine C falls back to similarity; a
 * rigid c at round-off level does not rotate.
 */
export function mlsPoint(vx, vy, src, dst, kind, alpha) {
  const k = src.length;
  // Displacements about their mean, positions about the sources' mean: small numbers, as in mls.py.
  let p0x = 0, p0y = 0, u0x = 0, u0y = 0;
  for (let i = 0; i < k; i++) {
    p0x += src[i][0]; p0y += src[i][1];
    u0x += dst[i][0] - src[i][0]; u0y += dst[i][1] - src[i][1];
  }
  p0x /= k; p0y /= k; u0x /= k; u0y /= k;
  const x = vx - p0x, y = vy - p0y;
  let d2min = Infinity, hits = 0, hx = 0, hy = 0;
  for (let i = 0; i < k; i++) {
    const dx = src[i][0] - p0x - x, dy = src[i][1] - p0y - y, d2 = dx * dx + dy * dy;
    if (d2 === 0) { hits++; hx += dst[i][0]; hy += dst[i][1]; }
    if (d2 < d2min) d2min = d2;
  }
  if (hits) return [hx / hits, hy / hits];
  // Weights rescaled to (d2min / d2)^alpha in (0, 1]: MLS is invariant to a common factor.
  let W = 0, px = 0, py = 0, ux = 0, uy = 0;
  const w = new Float64Array(k);
  for (let i = 0; i < k; i++) {
    const dx = src[i][0] - vx, dy = src[i][1] - vy;
    w[i] = Math.pow(d2min / (dx * dx + dy * dy), alpha);
    W += w[i];
    px += w[i] * (src[i][0] - p0x); py += w[i] * (src[i][1] - p0y);
    ux += w[i] * (dst[i][0] - src[i][0] - u0x); uy += w[i] * (dst[i][1] - src[i][1] - u0y);
  }
  px /= W; py /= W; ux /= W; uy /= W; // p*, u* (centred)
  let cxx = 0, cxy = 0, cyy = 0, dxx = 0, dxy = 0, dyx = 0, dyy = 0, s2 = 0;
  for (let i = 0; i < k; i++) {
    const ax = src[i][0] - p0x - px, ay = src[i][1] - p0y - py; // p^
    const bx = dst[i][0] - src[i][0] - u0x - ux, by = dst[i][1] - src[i][1] - u0y - uy; // u^
    cxx += w[i] * ax * ax; cxy += w[i] * ax * ay; cyy += w[i] * ay * ay;
    dxx += w[i] * ax * bx; dxy += w[i] * ax * by; dyx += w[i] * ay * bx; dyy += w[i] * ay * by;
    const rx = src[i][0] - vx, ry = src[i][1] - vy;
    s2 += w[i] * (rx * rx + ry * ry);
  }
  cxx /= W; cxy /= W; cyy /= W; dxx /= W; dxy /= W; dyx /= W; dyy /= W; s2 /= W;
  const ex = x - px, ey = y - py; // v - p*
  const tr = cxx + cyy;
  const translate = tr <= 64 * EPS * s2;
  let fx = 0, fy = 0;
  const rotate = (zr, zi) => [ex * zr - ey * zi, ex * zi + ey * zr];
  const similarity = () => translate ? [0, 0] : rotate((dxx + dyy) / tr, (dxy - dyx) / tr);
  if (kind === "affine") {
    const det = cxx * cyy - cxy * cxy;
    if (!translate && det > 256 * EPS * s2 * tr) {
      const rx = (ex * cyy - ey * cxy) / det, ry = (ey * cxx - ex * cxy) / det; // (v - p*) C^-1
      fx = rx * dxx + ry * dyx; fy = rx * dxy + ry * dyy;
    } else [fx, fy] = similarity();
  } else if (kind === "similarity") {
    [fx, fy] = similarity();
  } else if (kind === "rigid") {
    const cr = tr + dxx + dyy, ci = dxy - dyx, cabs = Math.hypot(cr, ci);
    if (!translate && cabs > 64 * EPS * (s2 + Math.abs(dxx) + Math.abs(dyy) + Math.abs(dxy) + Math.abs(dyx)))
      [fx, fy] = rotate(cr / cabs - 1, ci / cabs);
  } else {
    throw new Error(`kind must be one of ${KINDS.join(", ")}, got ${kind}`);
  }
  return [vx + fx + ux + u0x, vy + fy + uy + u0y];
}

/** Sample positions 0..n-1 every <= stride px, evenly spaced, first and last included (mls.py's _axis). */
export function axis(n, stride) {
  if (stride <= 1 || n <= 2) return Array.from({ length: n }, (_, i) => i);
  const m = Math.ceil((n - 1) / stride) + 1;
  return Array.from({ length: m }, (_, i) => (i * (n - 1)) / (m - 1));
}

/**
 * The coarse backward map of mls.backward_map(src, dst, height, width, kind, alpha, stride) before its
 * bilinear upsampling: {xs, ys, map: Float64Array [ys.length * xs.length * 2]}.
 */
export function coarseMap(src, dst, height, width, kind, alpha, stride) {
  if (!src.length || src.length !== dst.length) throw new Error("src and dst must pair up (at least one point)");
  const xs = axis(width, stride), ys = axis(height, stride);
  const map = new Float64Array(xs.length * ys.length * 2);
  let o = 0;
  for (const y of ys) for (const x of xs) {
    const [mx, my] = mlsPoint(x, y, src, dst, kind, alpha);
    map[o++] = mx; map[o++] = my;
  }
  return { xs, ys, map, width, height };
}

/** The full-size map (bilinear, align_corners as mls.py): Float32Array [height * width * 2]. */
export function upsample(coarse) {
  const { xs, ys, map, width, height } = coarse;
  const nx = xs.length, ny = ys.length, out = new Float32Array(width * height * 2);
  const fx = nx > 1 ? (nx - 1) / Math.max(width - 1, 1) : 0, fy = ny > 1 ? (ny - 1) / Math.max(height - 1, 1) : 0;
  let o = 0;
  for (let y = 0; y < height; y++) {
    const gy = y * fy, j0 = Math.min(Math.floor(gy), ny - 1), j1 = Math.min(j0 + 1, ny - 1), ty = gy - j0;
    for (let x = 0; x < width; x++) {
      const gx = x * fx, i0 = Math.min(Math.floor(gx), nx - 1), i1 = Math.min(i0 + 1, nx - 1), tx = gx - i0;
      for (let c = 0; c < 2; c++) {
        const a = map[(j0 * nx + i0) * 2 + c], b = map[(j0 * nx + i1) * 2 + c];
        const d = map[(j1 * nx + i0) * 2 + c], e = map[(j1 * nx + i1) * 2 + c];
        out[o++] = (a * (1 - tx) + b * tx) * (1 - ty) + (d * (1 - tx) + e * tx) * ty;
      }
    }
  }
  return out;
}

/** mls.backward_map in the browser: for every target pixel, the reference (x, y) to read. */
export function backwardMap(src, dst, height, width, kind = "affine", alpha = 1.0, stride = 8) {
  return upsample(coarseMap(src, dst, height, width, kind, alpha, stride));
}

/**
 * The garment (RGBA ImageData of the reference, alpha = garment mask) warped through a backward map onto an
 * ImageData of the target's size: nearest sampling, transparent where the map reads outside the garment.
 */
export function warpImage(garment, map, width, height) {
  const out = new ImageData(width, height), src = garment.data, dst = out.data, gw = garment.width, gh = garment.height;
  for (let i = 0, n = width * height; i < n; i++) {
    const sx = Math.round(map[2 * i]), sy = Math.round(map[2 * i + 1]);
    if (sx < 0 || sy < 0 || sx >= gw || sy >= gh) continue;
    const s = (sy * gw + sx) * 4;
    dst[4 * i] = src[s]; dst[4 * i + 1] = src[s + 1]; dst[4 * i + 2] = src[s + 2]; dst[4 * i + 3] = src[s + 3];
  }
  return out;
}
