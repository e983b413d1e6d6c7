"""ToyActionWorld: a procedural world of subjects doing actions, with exact ground truth.

Why: the method's claim (``<A>`` carries the action, not the exemplars' appearance) can only be
measured where every factor of an image is known. Each image is a pure function of a
:class:`Spec` (subject, action, colour, pattern, background, position, scale, mirror, seed), so
an action-different partner is the same spec with another action: identical context, only the
pose differs. Poses share one skeleton for every subject (cartoon style), so an action is the same
joint layout on a man and on a cat; subjects differ by silhouette (hair, helmet, ears, snout,
beak, wings, tail, body width) and are told apart at 32 px.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass, replace

from PIL import Image, ImageDraw

ACTIONS = ("standing", "jumping", "raising", "squatting", "kicking", "waving", "lying", "handstand")
HUMANS = ("man", "woman", "child", "robot", "astronaut")
ANIMALS = ("cat", "dog", "bear", "rabbit", "bird")
SUBJECTS = HUMANS + ANIMALS
COLOURS = {"red": (215, 35, 35), "blue": (40, 75, 215), "yellow": (240, 205, 30),
           "purple": (145, 55, 185), "white": (245, 245, 245)}
PATTERNS = ("plain", "striped")
#: background -> (sky/wall colour, ground colour, caption phrase)
BACKGROUNDS = {
    "park": ((160, 210, 240), (85, 150, 60), "in the park"),
    "beach": ((100, 175, 235), (225, 200, 140), "on the beach"),
    "room": ((215, 195, 170), (140, 95, 60), "in the room"),
    "street": ((185, 185, 200), (75, 75, 80), "on the street"),
    "night": ((20, 25, 60), (30, 50, 35), "at night"),
}
#: Combinations kept out of pretraining (one per action except the demo action, jumping).
HELD_OUT = (("bear", "standing"), ("cat", "raising"), ("astronaut", "squatting"), ("child", "kicking"),
            ("robot", "waving"), ("man", "lying"), ("rabbit", "handstand"))
PREFIXES = ("a photo of", "a picture of", "a rendering of")
WORDS = (*ACTIONS, *SUBJECTS, *COLOURS, *PATTERNS, "person", "photo", "picture", "rendering",
         "a", "an", "of", "in", "on", "at", "the", "park", "beach", "room", "street", "night")
GROUND = 0.92  # y of the feet line in unit coordinates (y grows downwards)
SUPERSAMPLE = 4
OUTLINE = (25, 20, 30)

# Skeleton per action in unit coordinates, figure centred at x=0.5, feet on GROUND (standing).
# Keys: head, neck, hip, arms [(elbow, hand), (elbow, hand)], legs [(knee, foot), (knee, foot)].
_ARMS_DOWN = [((0.41, 0.45), (0.38, 0.58)), ((0.59, 0.45), (0.62, 0.58))]
_LEGS = [((0.45, 0.76), (0.43, 0.92)), ((0.55, 0.76), (0.57, 0.92))]
POSES = {
    "standing": dict(head=(0.5, 0.19), neck=(0.5, 0.3), hip=(0.5, 0.6), arms=_ARMS_DOWN, legs=_LEGS),
    "raising": dict(head=(0.5, 0.19), neck=(0.5, 0.3), hip=(0.5, 0.6),
                    arms=[((0.42, 0.2), (0.41, 0.05)), ((0.58, 0.2), (0.59, 0.05))], legs=_LEGS),
    "waving": dict(head=(0.5, 0.19), neck=(0.5, 0.3), hip=(0.5, 0.6),
                   arms=[_ARMS_DOWN[0], ((0.66, 0.24), (0.72, 0.08))], legs=_LEGS),
    "jumping": dict(head=(0.5, 0.1), neck=(0.5, 0.2), hip=(0.5, 0.47),
                    arms=[((0.36, 0.14), (0.2, 0.06)), ((0.64, 0.14), (0.8, 0.06))],
                    legs=[((0.33, 0.58), (0.3, 0.72)), ((0.67, 0.58), (0.7, 0.72))]),
    "squatting": dict(head=(0.5, 0.42), neck=(0.5, 0.52), hip=(0.5, 0.72),
                      arms=[((0.38, 0.56), (0.25, 0.56)), ((0.62, 0.56), (0.75, 0.56))],
                      legs=[((0.33, 0.72), (0.36, 0.92)), ((0.67, 0.72), (0.64, 0.92))]),
    "kicking": dict(head=(0.5, 0.19), neck=(0.5, 0.3), hip=(0.5, 0.6),
                    arms=[((0.38, 0.38), (0.26, 0.44)), ((0.62, 0.38), (0.74, 0.44))],
                    legs=[((0.46, 0.76), (0.45, 0.92)), ((0.66, 0.6), (0.86, 0.56))]),
    "lying": dict(head=(0.17, 0.82), neck=(0.27, 0.84), hip=(0.57, 0.84),
                  arms=[((0.37, 0.88), (0.47, 0.89)), ((0.37, 0.8), (0.47, 0.79))],
                  legs=[((0.71, 0.86), (0.85, 0.87)), ((0.71, 0.82), (0.85, 0.81))]),
    "handstand": dict(head=(0.5, 0.8), neck=(0.5, 0.69), hip=(0.5, 0.39),
                      arms=[((0.42, 0.8), (0.4, 0.92)), ((0.58, 0.8), (0.6, 0.92))],
                      legs=[((0.45, 0.23), (0.44, 0.07)), ((0.55, 0.23), (0.56, 0.07))]),
}
# Body shape per subject: head radius, torso width, limb width (unit coordinates).
SHAPES = {
    "man": (0.065, 0.13, 0.05), "woman": (0.065, 0.12, 0.045), "child": (0.085, 0.12, 0.045),
    "robot": (0.07, 0.15, 0.05), "astronaut": (0.09, 0.15, 0.06), "cat": (0.07, 0.11, 0.04),
    "dog": (0.07, 0.13, 0.05), "bear": (0.08, 0.19, 0.07), "rabbit": (0.065, 0.11, 0.04),
    "bird": (0.07, 0.16, 0.035),
}
SKIN, HAIR, GRAY, DARK = (240, 198, 160), (60, 40, 30), (165, 168, 180), (45, 45, 70)


@dataclass(frozen=True)
class Spec:
    """Every factor of one image; ``render(spec)`` is a pure function of it."""

    subject: str
    action: str
    colour: str = "red"
    pattern: str = "plain"
    background: str = "park"
    x: float = 0.0  # horizontal offset of the figure centre (clamped so the figure stays inside)
    scale: float = 0.9
    mirror: bool = False
    seed: int = 0  # joint jitter and background shade

    def __post_init__(self):
        for value, known in ((self.subject, SUBJECTS), (self.action, ACTIONS), (self.colour, COLOURS),
                             (self.pattern, PATTERNS), (self.background, BACKGROUNDS)):
            if value not in known:
                raise ValueError(f"unknown toy value {value!r}; known: {', '.join(known)}")

    def with_action(self, action: str) -> Spec:
        """The action-different partner: same subject and context, another pose."""
        return replace(self, action=action)

    def as_dict(self) -> dict:
        return asdict(self)


def sample_spec(rng: random.Random, subject: str | None = None, action: str | None = None,
                **fixed) -> Spec:
    """A random spec; any factor given is kept."""
    values = dict(
        subject=subject or rng.choice(SUBJECTS), action=action or rng.choice(ACTIONS),
        colour=rng.choice(list(COLOURS)), pattern=rng.choice(PATTERNS),
        background=rng.choice(list(BACKGROUNDS)), x=rng.uniform(-0.15, 0.15),
        scale=rng.uniform(0.72, 1.0), mirror=rng.random() < 0.5, seed=rng.randrange(2**31),
    )
    values.update({k: v for k, v in fixed.items() if v is not None})
    return Spec(**values)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(spec: Spec, rng: random.Random | None = None, p_colour=0.6, p_pattern=0.4,
            p_background=0.5, p_person=0.2) -> str:
    """``a photo of a [striped] [yellow] cat jumping [on the beach]``; with ``rng=None`` all words.

    Human subjects are called ``person`` with probability ``p_person`` so the ADI initialiser and
    templates ("a photo of a person <A>") mean a generic human figure.
    """
    full = rng is None
    rng = rng or random.Random(0)
    subject = "person" if spec.subject in HUMANS and not full and rng.random() < p_person else spec.subject
    words = []
    if full or rng.random() < p_pattern:
        words.append(spec.pattern)
    if full or rng.random() < p_colour:
        words.append(spec.colour)
    words += [subject, spec.action]
    prefix = PREFIXES[0] if full else rng.choice(PREFIXES)
    text = f"{prefix} {_article(words[0])} {' '.join(words)}"
    if full or rng.random() < p_background:
        text += " " + BACKGROUNDS[spec.background][2]
    return text


_CAPTION = re.compile(
    r"^a (?:photo|picture|rendering) of (?:a|an) (?:(?P<pattern>%s) )?(?:(?P<colour>%s) )?"
    r"(?P<subject>%s) (?P<action>%s)(?: (?P<background>%s))?$" % (
        "|".join(PATTERNS), "|".join(COLOURS), "|".join((*SUBJECTS, "person")), "|".join(ACTIONS),
        "|".join(re.escape(b[2]) for b in BACKGROUNDS.values())))


def parse_caption(text: str) -> dict[str, str | None]:
    """Factors named by a caption (None where the caption leaves one out); raises if malformed."""
    match = _CAPTION.match(text.strip())
    if not match:
        raise ValueError(f"not a toy caption: {text!r}")
    out = match.groupdict()
    phrase = out.pop("background")
    out["background"] = next((k for k, v in BACKGROUNDS.items() if v[2] == phrase), None)
    return out


def _skeleton(spec: Spec, rng: random.Random) -> dict:
    """Joint positions in unit coordinates: pose + jitter, mirrored, scaled about the feet, shifted."""
    pose = POSES[spec.action]
    j = 0.018
    pts = [pose["head"], pose["neck"], pose["hip"]] + [p for limb in pose["arms"] + pose["legs"] for p in limb]
    pts = [(x + rng.uniform(-j, j), y + rng.uniform(-j, j)) for x, y in pts]
    # child: shorter body under a big head
    if spec.subject == "child":
        neck = pts[1]
        pts = [pts[0]] + [(neck[0] + (x - neck[0]) * 0.85, neck[1] + (y - neck[1]) * 0.85) for x, y in pts[1:]]
    if spec.mirror:
        pts = [(1 - x, y) for x, y in pts]
    s = spec.scale
    pts = [(0.5 + (x - 0.5) * s, GROUND + (y - GROUND) * s) for x, y in pts]
    lo, hi = min(x for x, _ in pts) - 0.1 * s, max(x for x, _ in pts) + 0.1 * s
    dx = min(max(spec.x, 0.02 - lo), 0.98 - hi)
    pts = [(x + dx, y) for x, y in pts]
    head, neck, hip, *limbs = pts
    return dict(head=head, neck=neck, hip=hip, arms=[limbs[0:2], limbs[2:4]], legs=[limbs[4:6], limbs[6:8]])


def _unit(a, b):
    dx, dy = b[0] - a[0], b[1] - a[1]
    n = math.hypot(dx, dy) or 1.0
    return dx / n, dy / n


class _Canvas:
    """Unit-coordinate drawing on a supersampled image, every shape outlined for contrast."""

    def __init__(self, size: int, sky):
        self.big = size * SUPERSAMPLE
        self.img = Image.new("RGB", (self.big, self.big), sky)
        self.draw = ImageDraw.Draw(self.img)
        self.o = SUPERSAMPLE * 0.8 / self.big  # outline width in unit coordinates

    def _px(self, pts):
        return [(x * self.big, y * self.big) for x, y in pts]

    def line(self, pts, width, fill, outline=True):
        if outline:
            self.draw.line(self._px(pts), fill=OUTLINE, width=round((width + 2 * self.o) * self.big), joint="curve")
            for p in (pts[0], pts[-1]):
                self.disc(p, width / 2 + self.o, OUTLINE, outline=False)
        self.draw.line(self._px(pts), fill=fill, width=max(1, round(width * self.big)), joint="curve")
        for p in (pts[0], pts[-1]):
            self.disc(p, width / 2, fill, outline=False)

    def disc(self, c, r, fill, outline=True, ry=None):
        ry = r if ry is None else ry
        if outline:
            self.disc(c, r + self.o, OUTLINE, outline=False, ry=ry + self.o)
        x, y = c[0] * self.big, c[1] * self.big
        self.draw.ellipse([x - r * self.big, y - ry * self.big, x + r * self.big, y + ry * self.big], fill=fill)

    def poly(self, pts, fill, outline=True):
        self.draw.polygon(self._px(pts), fill=fill, outline=OUTLINE if outline else None,
                          width=max(1, round(self.o * self.big)) if outline else 1)


def _background(cv: _Canvas, spec: Spec, rng: random.Random) -> None:
    sky, ground, _ = BACKGROUNDS[spec.background]
    horizon = 0.78 + rng.uniform(-0.02, 0.02)
    cv.poly([(0, horizon), (1, horizon), (1, 1), (0, 1)], ground, outline=False)
    if spec.background == "beach":
        cv.poly([(0, horizon - 0.06), (1, horizon - 0.06), (1, horizon), (0, horizon)], (30, 100, 180), outline=False)
    elif spec.background == "night":
        cv.disc((0.84 if spec.mirror else 0.16, 0.14), 0.07, (245, 240, 200), outline=False)
    elif spec.background == "room":
        cv.poly([(0.06, 0.12), (0.28, 0.12), (0.28, 0.36), (0.06, 0.36)], (170, 210, 235))
    elif spec.background == "street":
        cv.poly([(0.0, 0.3), (0.18, 0.3), (0.18, horizon), (0.0, horizon)], (150, 130, 125), outline=False)
        cv.poly([(0.82, 0.4), (1.0, 0.4), (1.0, horizon), (0.82, horizon)], (150, 130, 125), outline=False)
    elif spec.background == "park":
        cv.disc((0.86, 0.14), 0.06, (250, 220, 80), outline=False)


def _stripe_colour(c):
    return (30, 30, 30) if sum(c) > 380 else (245, 245, 245)


def _torso(cv: _Canvas, spec: Spec, neck, hip, width, colour) -> None:
    ux, uy = _unit(hip, neck)
    px_, py_ = -uy, ux
    ext = 0.02
    a = (neck[0] + ux * ext, neck[1] + uy * ext)
    b = (hip[0] - ux * ext, hip[1] - uy * ext)
    w = width / 2
    corners = [(a[0] + px_ * w, a[1] + py_ * w), (a[0] - px_ * w, a[1] - py_ * w),
               (b[0] - px_ * w, b[1] - py_ * w), (b[0] + px_ * w, b[1] + py_ * w)]
    if spec.subject in ("bird", "bear"):
        cx, cy = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
        length = math.hypot(a[0] - b[0], a[1] - b[1]) / 2
        horizontal = abs(ux) > abs(uy)
        cv.disc((cx, cy), length if horizontal else w, colour, ry=w if horizontal else length)
    else:
        cv.poly(corners, colour)
    if spec.pattern == "striped":
        length = math.hypot(a[0] - b[0], a[1] - b[1])
        n = max(2, int(length / 0.075))
        for i in range(n):
            t = (i + 0.5) / n
            c = (b[0] + (a[0] - b[0]) * t, b[1] + (a[1] - b[1]) * t)
            cv.line([(c[0] + px_ * w * 0.8, c[1] + py_ * w * 0.8), (c[0] - px_ * w * 0.8, c[1] - py_ * w * 0.8)],
                    0.022, _stripe_colour(colour), outline=False)
    if spec.subject == "woman":  # skirt
        s = 0.09
        cv.poly([(b[0] + px_ * w, b[1] + py_ * w), (b[0] - px_ * w, b[1] - py_ * w),
                 (b[0] - px_ * (w + s) - ux * s * 1.3, b[1] - py_ * (w + s) - uy * s * 1.3),
                 (b[0] + px_ * (w + s) - ux * s * 1.3, b[1] + py_ * (w + s) - uy * s * 1.3)], colour)


def _head(cv: _Canvas, spec: Spec, head, neck, r, colour) -> None:
    ux, uy = _unit(neck, head)  # "up" of the head
    px_, py_ = -uy, ux  # "right" of the head (snout/beak side)
    if spec.mirror:
        px_, py_ = -px_, -py_

    def at(u, v):
        return (head[0] + ux * u + px_ * v, head[1] + uy * u + py_ * v)

    s = spec.subject
    if s == "woman":  # long hair behind the head
        cv.disc(at(-0.03, 0), r * 1.35, (235, 190, 60))
    if s == "rabbit":
        for side in (-1, 1):
            cv.line([at(r * 0.6, side * r * 0.45), at(r * 2.6, side * r * 0.7)], 0.04, colour)
    if s == "cat":
        for side in (-1, 1):
            cv.poly([at(r * 0.5, side * r * 0.95), at(r * 1.8, side * r * 0.75), at(r * 0.9, side * r * 0.1)], colour)
    if s == "bear":
        for side in (-1, 1):
            cv.disc(at(r * 0.8, side * r * 0.8), r * 0.42, colour)
    if s == "robot":
        cv.line([at(r * 0.8, 0), at(r * 1.7, 0)], 0.015, GRAY)
        cv.disc(at(r * 1.8, 0), 0.02, (230, 40, 40))
        cv.poly([at(r, -r), at(r, r), at(-r, r), at(-r, -r)], GRAY)
        cv.poly([at(r * 0.35, -r * 0.6), at(r * 0.35, r * 0.6), at(0, r * 0.6), at(0, -r * 0.6)], (40, 220, 240))
        return
    face = SKIN if s in ("man", "woman", "child") else ((250, 250, 250) if s == "astronaut" else colour)
    cv.disc(head, r, face)
    if s == "astronaut":
        cv.disc(at(0.0, r * 0.25), r * 0.62, (30, 40, 90), outline=False, ry=r * 0.5)
    elif s in ("man", "child"):
        hair = HAIR if s == "man" else (150, 90, 30)
        cv.poly([at(r * 1.05, -r * 0.9), at(r * 1.05, r * 0.9), at(r * 0.3, r * 1.05), at(r * 0.3, -r * 1.05)], hair)
    elif s == "dog":
        cv.disc(at(-r * 0.25, r * 0.8), r * 0.55, (40, 25, 15))  # snout
        for side in (-1, 1):
            cv.disc(at(r * 0.1, side * r * 1.05), r * 0.35, (90, 55, 30), ry=r * 0.7)
    elif s == "bird":
        cv.poly([at(r * 0.25, r * 0.8), at(-r * 0.1, r * 1.9), at(-r * 0.35, r * 0.7)], (250, 150, 20))
        cv.line([at(r * 0.9, 0), at(r * 1.5, -r * 0.3)], 0.02, (230, 40, 40))  # crest


def _limbs(cv: _Canvas, spec: Spec, sk: dict, colour, width) -> None:
    s = spec.subject
    arm_colour = {"man": colour, "woman": SKIN, "child": colour, "robot": GRAY, "astronaut": (250, 250, 250)}.get(s, colour)
    leg_colour = {"man": DARK, "woman": SKIN, "child": (60, 90, 160), "robot": GRAY, "bird": (250, 150, 20)}.get(s, colour)
    for elbow, hand in sk["arms"]:
        if s == "bird":  # wing: a tapered fan from shoulder to hand
            ux, uy = _unit(sk["neck"], hand)
            n = (-uy * 0.06, ux * 0.06)
            cv.poly([sk["neck"], (hand[0] + n[0], hand[1] + n[1]), (hand[0] - n[0], hand[1] - n[1])], colour)
        else:
            cv.line([sk["neck"], elbow, hand], width, arm_colour)
    for knee, foot in sk["legs"]:
        cv.line([sk["hip"], knee, foot], width if s != "bird" else 0.025, leg_colour)


def _tail(cv: _Canvas, spec: Spec, sk: dict, colour) -> None:
    hip, neck = sk["hip"], sk["neck"]
    ux, uy = _unit(neck, hip)
    px_, py_ = (-uy, ux) if not spec.mirror else (uy, -ux)
    if spec.subject == "cat":
        cv.line([hip, (hip[0] - px_ * 0.12, hip[1] - py_ * 0.12), (hip[0] - px_ * 0.16 - ux * 0.16, hip[1] - py_ * 0.16 - uy * 0.16)], 0.03, colour)
    elif spec.subject == "dog":
        cv.line([hip, (hip[0] - px_ * 0.1 - ux * 0.06, hip[1] - py_ * 0.1 - uy * 0.06)], 0.035, colour)
    elif spec.subject == "rabbit":
        cv.disc((hip[0] - px_ * 0.07, hip[1] - py_ * 0.07), 0.04, (250, 250, 250))


def render(spec: Spec, size: int = 32) -> Image.Image:
    """Draw ``spec`` (deterministic) at ``size`` px: supersampled, then downsampled (antialiased)."""
    rng = random.Random(spec.seed)
    sky, _, _ = BACKGROUNDS[spec.background]
    shade = rng.randint(-10, 10)
    cv = _Canvas(size, tuple(max(0, min(255, c + shade)) for c in sky))
    _background(cv, spec, rng)
    sk = _skeleton(spec, rng)
    head_r, torso_w, limb_w = (v * spec.scale for v in SHAPES[spec.subject])
    colour = COLOURS[spec.colour]
    if spec.action == "jumping":  # shadow on the ground: the figure is airborne
        cv.disc(((sk["legs"][0][1][0] + sk["legs"][1][1][0]) / 2, GROUND + 0.02), 0.12 * spec.scale, (20, 20, 20),
                outline=False, ry=0.025)
    _tail(cv, spec, sk, colour)
    if spec.subject == "astronaut":  # backpack
        cv.line([sk["neck"], sk["hip"]], torso_w * 1.25, (200, 200, 210))
    _limbs(cv, spec, sk, colour, limb_w)
    _torso(cv, spec, sk["neck"], sk["hip"], torso_w, colour)
    _head(cv, spec, sk["head"], sk["neck"], head_r, colour)
    return cv.img.resize((size, size), Image.Resampling.LANCZOS)


class ToyActionWorld:
    """Seeded sampler of (image, spec, caption) triples; ``held_out`` combos never appear in ``sample``.

    Args:
        size: Image side in pixels (32 matches the shipped pipeline).
        seed: Seeds the sampler; the same seed gives the same stream.
        held_out: (subject, action) pairs excluded from ``sample`` (pretraining never sees them).
    """

    def __init__(self, size: int = 32, seed: int = 0, held_out=HELD_OUT):
        self.size = size
        self.rng = random.Random(seed)
        self.held_out = frozenset(tuple(p) for p in held_out)
        self.combos = [(s, a) for s in SUBJECTS for a in ACTIONS if (s, a) not in self.held_out]

    def sample_spec(self, **fixed) -> Spec:
        if "subject" not in fixed and "action" not in fixed:
            fixed["subject"], fixed["action"] = self.rng.choice(self.combos)
        return sample_spec(self.rng, **fixed)

    def sample(self, **fixed) -> tuple[Image.Image, Spec, str]:
        spec = self.sample_spec(**fixed)
        return render(spec, self.size), spec, caption(spec, self.rng)
