"""A tiny ray-cast RGB-D scene for the pipeline tests until/unless the data renderer is used:
a textured box room and moving spheres, exact depth, GT poses and dynamic masks."""
import numpy as np


def _texture(p):
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    v = (np.sin(7.1 * x + 3.0 * np.sin(5.3 * y)) + np.sin(6.3 * y + 2.0 * np.sin(4.1 * z))
         + np.sin(5.7 * z + 2.5 * np.sin(6.7 * x)) + 0.5 * np.sin(23.0 * x + 19.0 * y + 17.0 * z))
    return v


def look_at(eye, target, up=(0, -1, 0)):
    f = np.asarray(target, float) - eye
    f /= np.linalg.norm(f)
    r = np.cross(f, up)
    r /= np.linalg.norm(r)
    d = np.cross(f, r)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = r, d, f, eye
    return T


def render(n=30, w=160, h=120, movers=1, seed=0):
    rng = np.random.default_rng(seed)
    K = np.array([[w * 0.8, 0, w / 2 - 0.5], [0, w * 0.8, h / 2 - 0.5], [0, 0, 1]])
    lo, hi = np.array([-2.0, -1.5, -2.0]), np.array([2.0, 1.5, 3.0])
    xs, ys = np.meshgrid(np.arange(w), np.arange(h))
    rays_c = np.stack([(xs - K[0, 2]) / K[0, 0], (ys - K[1, 2]) / K[1, 1], np.ones_like(xs, float)], -1)
    frames, poses, masks = [], [], []
    phase = rng.uniform(0, 6, size=movers)
    for k in range(n):
        s = k / 30.0
        eye = np.array([0.3 * np.sin(1.3 * s), 0.1 * np.sin(2.1 * s), -0.8 + 0.2 * s])
        T = look_at(eye, np.array([0.2 * np.sin(0.7 * s), 0.0, 2.5]))
        d = rays_c @ T[:3, :3].T
        o = T[:3, 3]
        tmin = np.full((h, w), np.inf)
        with np.errstate(divide='ignore', invalid='ignore'):
            for ax in range(3):
                for bound in (lo[ax], hi[ax]):
                    t = (bound - o[ax]) / d[..., ax]
                    t = np.where(t > 1e-6, t, np.inf)
                    tmin = np.minimum(tmin, t)
        dyn = np.zeros((h, w), bool)
        off = np.zeros((h, w, 3))
        for m in range(movers):
            c = np.array([0.9 * np.sin(2.0 * s + phase[m]), 0.3 * np.cos(1.5 * s + phase[m]), 1.6 + 0.4 * m])
            rad = 0.35
            oc = o - c
            bq = np.einsum('hwi,i->hw', d, oc)
            aq = np.einsum('hwi,hwi->hw', d, d)
            disc = bq ** 2 - aq * (oc @ oc - rad ** 2)
            with np.errstate(invalid='ignore'):
                t = (-bq - np.sqrt(disc)) / aq
            hit = (disc > 0) & (t > 0) & (t < tmin)
            tmin = np.where(hit, t, tmin)
            dyn |= hit
            off = np.where(hit[..., None], c - 5.0 * (m + 1), off)
        X = o + d * tmin[..., None]
        tex = _texture(X - np.where(dyn[..., None], off, 0.0))
        # movers get their own texture in object coordinates so it moves with them
        gray = 128 + 30 * tex
        rgb = np.clip(np.stack([gray, gray * 0.9 + 10, gray * 0.8 + 20], -1), 0, 255).astype(np.uint8)
        depth = tmin.astype(np.float32)  # ray has z=1 component in camera frame
        frames.append((k / 30.0, rgb, depth))
        poses.append(T)
        masks.append(dyn)
    return frames, np.array(poses), np.array(masks), K
