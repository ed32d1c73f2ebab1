"""Named condition presets of the synthetic renderer (the rows of issue 16's table, and a few more).

``scenario_config('close_crossing', seed=3)`` gives the SyntheticConfig of a preset with overrides;
``dynrecon render --scenario NAME`` and ``bench/segmentation.py`` use them. A preset sets only the
fields it names; everything else keeps SyntheticConfig's defaults.
"""
from __future__ import annotations

from dataclasses import fields

from dynrecon_ros.config import typed_like
from dynrecon_ros.data.synthetic import SyntheticConfig

# The sensor effects of issue 16's second row: silhouette holes, motion blur, exposure flicker, colour
# noise, depth 10 ms after colour, hand-held jitter.
ISSUE_EFFECTS = dict(silhouette_holes=True, motion_blur=0.012, exposure_flicker=0.08, colour_noise=3.0,
                     depth_delay=0.010, jitter=1.0)
# Every sensor effect at once: those plus Kinect v1 noise and quantisation, 5.5 m range, 3 % blobs,
# a 25 ms rolling shutter.
SENSOR_EFFECTS = dict(ISSUE_EFFECTS, kinect=True, max_range=5.5, depth_holes=0.03, rolling_shutter=0.025)
KINECT = dict(kinect=True, silhouette_holes=True, max_range=5.5, depth_holes=0.03)

SCENARIOS: dict[str, tuple[str, dict]] = {
    'default': ('the default sequence: 2 textured cylinder movers, 320x240', {}),
    'walking_people': ('3 articulated walking people, 640x480, Kinect v1 depth with silhouettes and 3 % holes',
                       dict(width=640, height=480, movers=0, people=3, **KINECT)),
    'close_crossing': ('2 walking people + one crossing ~1 m from the camera, 320x240, the sensor effects of '
                       'issue 16 (silhouette holes, blur, flicker, colour noise, depth 10 ms late, jitter)',
                       dict(movers=0, people=2, close_crossing=True, **ISSUE_EFFECTS)),
    'every_effect': ('the close_crossing people with every sensor effect (+ Kinect noise, range, 3 % blobs, '
                     'rolling shutter)', dict(movers=0, people=2, close_crossing=True, **SENSOR_EFFECTS)),
    'people_clean': ('the close_crossing people without sensor effects, 320x240',
                     dict(movers=0, people=2, close_crossing=True)),
    'people_holes': ('the close_crossing people with 3 % depth holes (blobs) only, 320x240',
                     dict(movers=0, people=2, close_crossing=True, depth_holes=0.03)),
    'stop_and_go': ('3 walking people who stop ~1.5 s and walk on, 320x240, 120 frames',
                    dict(movers=0, people=3, stop_and_go=True, frames=120)),
    'toward_camera': ('2 walking people + one walking straight toward the camera (4 m to 0.9 m), 320x240',
                      dict(movers=0, people=2, toward_camera=True)),
    'camouflage': ('2 rigid movers with a background-like texture fixed in the world (no usable flow), 640x480',
                   dict(width=640, height=480, camouflage='background')),
    'camouflage_small': ('the camouflage movers at 320x240', dict(camouflage='background')),
    'camouflage_holes': ('the camouflage movers at 640x480 with 3 % depth holes',
                         dict(width=640, height=480, camouflage='background', depth_holes=0.03)),
    'camouflage_uniform': ('2 rigid movers of one flat colour, 320x240', dict(camouflage='uniform')),
    'static_effects': ('no movers, every sensor effect, 320x240 (nothing may be flagged)',
                       dict(movers=0, **SENSOR_EFFECTS)),
}


def parse_overrides(items: list[str]) -> dict:
    """['width=640', 'frames=200', 'kinect=true'] -> SyntheticConfig overrides, each typed like its field's default
    (bool: true / false / 1 / 0 / yes / no). ValueError naming the item that is wrong."""
    defaults = {f.name: f.default for f in fields(SyntheticConfig)}
    out = {}
    for it in items:
        key, eq, value = it.partition('=')
        if not eq or key not in defaults:
            raise ValueError(f'render override {it!r}: expected field=value with a SyntheticConfig field '
                             f'({", ".join(defaults)})')
        out[key] = typed_like(defaults[key], value, f'render {it}')
    return out


def scenario_config(name: str, **overrides) -> SyntheticConfig:
    """Preset ``name`` with ``overrides`` (SyntheticConfig fields) -> SyntheticConfig. ValueError for an
    unknown name or field."""
    if name not in SCENARIOS:
        raise ValueError(f'unknown scenario {name!r}; known: {", ".join(SCENARIOS)}')
    known = {f.name for f in fields(SyntheticConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f'unknown SyntheticConfig field(s): {", ".join(bad)}')
    return SyntheticConfig(**{**SCENARIOS[name][1], **overrides})
