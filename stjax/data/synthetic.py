"""A synthetic Ego-ST-style set: first-person walks through corridors past coloured landmarks.

Each walk is a random route on a coarse grid (straight segments joined by 90-degree left/right turns)
carved as 3-cell-wide corridors; coloured objects (cubes, cylinders, spheres, cones) stand beside the
path. A small ray-caster renders the walk (walls by grid DDA, a checkered floor, objects as shaded
billboards with a depth test), PyAV writes the mp4, and the ground truth of every question comes from
the route itself: the turn sequence, the order in which landmarks are passed, and the action list,
each forward and reversed (walking back mirrors every turn and reverses every order).

Outputs (all byte-identical for the same seed):
  synth/walk_XXXX.mp4, scenes/walk_XXXX.json   videos and the geometry they were drawn from
  Synth_{forward,reverse}_mcq{,_landmark,_action}.json   Ego-ST Bench MCQ files (4 options; the gold letters
                      balanced within every file; `tasks` may add _colour, the first landmark's colour)
  st_r1_synth.jsonl   ST-R1 rows whose solutions follow the release's reverse-thinking template
  plain.jsonl         our plain format, forward/reverse pairs linked
  tokenizer/          a small BPE tokenizer trained on all of the above text (see tokenizer.py)
  contact_sheet.png   the 8 frames the model sees for a few walks, with their answers

Run: python -m stjax.data.synthetic --out DIR --n N --seed S
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw

from stjax.data.formats import Sample, release_problem, write_plain_jsonl
from stjax.data.processor import user_text
from stjax.data.tokenizer import build_tokenizer

COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
    "green": (40, 170, 60),
    "purple": (150, 60, 200),
    "orange": (245, 130, 20),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}
SHAPES = ("cube", "cylinder", "sphere", "cone")
# Each walk's corridor walls are painted one of these (pale, so every landmark stands out against them).
# The walls question lists them in this order, so its letter names the paint: a tiny model learns to name
# a colour from pixels in minutes, but not to find that name among shuffled options and copy its letter.
WALLS = {
    "sand": (225, 205, 160),
    "pink": (235, 170, 185),
    "mint": (170, 225, 190),
    "sky": (170, 195, 240),
}
HEADER = "Please take a egocentric view to understand the following questions. Based on this video, "
# The release's wording of each question, keyed by (task, direction).
QUESTIONS = {
    ("direction", "forward"): "what directions do you need to go through to get to your destination",
    ("direction", "reverse"): "what directions do you need to go through to get to the starting point",
    ("landmark", "forward"): "which landmarks (objects or scenery changes) did you pass by to reach your destination",
    (
        "landmark",
        "reverse",
    ): "which landmarks (objects or scenery changes) did you pass by to return to the starting point",
    ("action", "forward"): "which actions did you perform to reach your destination",
    ("action", "reverse"): "which actions did you perform to return to the starting point",
    # Not in Ego-ST: questions a tiny vision tower can answer from the pixels of one frame. colour: the
    # wrong options are colours no landmark of the walk has; both directions ask about the landmark
    # nearest the start, so the reverse-thinking solution names the colour asked for. walls: the
    # corridor's paint, in every frame, its options the paints in WALLS' order (the embedded demo's task).
    ("colour", "forward"): "what colour was the first landmark you passed on the way to your destination",
    ("colour", "reverse"): "what colour was the last landmark you passed on the way back to the starting point",
    ("walls", "forward"): "what colour were the walls on the way to your destination",
    ("walls", "reverse"): "what colour were the walls on the way back to the starting point",
}
FILE_SUFFIX = {
    "direction": "mcq",
    "landmark": "mcq_landmark",
    "action": "mcq_action",
    "colour": "mcq_colour",
    "walls": "mcq_walls",
}
TASKS = ("direction", "landmark", "action")  # Ego-ST's tasks, the default set
HEADINGS = ((0, 1), (1, 0), (0, -1), (-1, 0))  # north, east, south, west: turning right adds 1
CELL = 3  # one coarse route cell is a 3x3 block of unit cells (a corridor three cells wide)


@dataclass(frozen=True)
class RenderConfig:
    width: int = 224
    height: int = 224
    fps: int = 5
    fov_degrees: float = 90.0
    speed: float = 0.4  # world units per frame (2 units/s: at 1 fps sampling, every walk gets >= 8 frames)
    turn_frames: int = 6  # frames for a 90-degree turn
    eye_height: float = 0.5  # walls are 1 unit high


@dataclass
class Landmark:
    name: str
    x: float
    y: float
    segment: int  # index of the straight segment it stands beside


@dataclass
class Walk:
    """A route and what stands along it; everything the questions ask about."""

    grid: np.ndarray  # (rows=y, cols=x) 1 = wall
    waypoints: list[tuple[float, float]]  # start, every corner, destination (world coordinates)
    turns: list[str]  # "left" / "right" at each corner
    landmarks: list[Landmark]  # in the order they are passed
    wall: str = "sand"  # the walls' paint, a key of WALLS


# ----------------------------------------------------------------------------- scene generation


def _route(rng: np.random.Generator) -> tuple[list[tuple[int, int]], list[int], list[str], list[int]]:
    """A self-avoiding coarse route: cells, the cell index of each corner, turns, segment lengths."""
    while True:
        n_turns = int(rng.integers(1, 4))
        lengths = [int(rng.integers(2, 4)) for _ in range(n_turns + 1)]
        turns = [str(rng.choice(["left", "right"])) for _ in range(n_turns)]
        heading, cells, corners = 0, [(0, 0)], []
        for i, length in enumerate(lengths):
            dx, dy = HEADINGS[heading]
            for _ in range(length):
                cells.append((cells[-1][0] + dx, cells[-1][1] + dy))
            if i < n_turns:
                corners.append(len(cells) - 1)
                heading = (heading + (1 if turns[i] == "right" else -1)) % 4
        # Corridors must not touch except where the route joins them (cells 2 apart meet at a corner).
        ok = all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2 for i, a in enumerate(cells) for b in cells[i + 3 :])
        if ok:
            return cells, corners, turns, lengths


def make_walk(rng: np.random.Generator) -> Walk:
    cells, corners, turns, lengths = _route(rng)
    xs, ys = [c[0] for c in cells], [c[1] for c in cells]
    # Shift so the route sits one coarse cell inside the grid (a wall border all round).
    ox, oy = 1 - min(xs), 1 - min(ys)
    cells = [(x + ox, y + oy) for x, y in cells]
    grid = np.ones(((max(ys) + oy + 2) * CELL, (max(xs) + ox + 2) * CELL), np.uint8)
    for x, y in cells:
        grid[y * CELL : (y + 1) * CELL, x * CELL : (x + 1) * CELL] = 0

    def centre(cell: tuple[int, int]) -> tuple[float, float]:
        return (cell[0] * CELL + CELL / 2, cell[1] * CELL + CELL / 2)

    waypoints = [centre(cells[0])] + [centre(cells[i]) for i in corners] + [centre(cells[-1])]
    # Landmarks stand beside the last one or two cells before a corner (or the end), never at the
    # start or a corner, 0.8 units left or right of the path: they are in view for most of their
    # segment, so the 8 sampled frames catch them, and the walker passes right by them.
    candidates = []
    index = 0
    for seg, length in enumerate(lengths):
        for step in range(max(1, length - 2), length):
            candidates.append((seg, index + step))
        index += length
    count = int(rng.integers(2, min(4, len(candidates)) + 1))
    chosen = sorted(rng.choice(len(candidates), size=count, replace=False).tolist())
    names = rng.permutation([f"{c} {s}" for c in COLOURS for s in SHAPES])[:count]
    landmarks = []
    for name, pick in zip(names, chosen):
        seg, cell_index = candidates[pick]
        (x0, y0), (x1, y1) = cells[cell_index - 1], cells[cell_index]
        dx, dy = x1 - x0, y1 - y0  # heading along this segment
        side = 0.8 if rng.random() < 0.5 else -0.8  # > 0: right of the path
        cx, cy = centre(cells[cell_index])
        landmarks.append(Landmark(str(name), cx + side * dy, cy - side * dx, seg))
    return Walk(grid, waypoints, turns, landmarks, str(rng.choice(list(WALLS))))


def camera_path(walk: Walk, cfg: RenderConfig) -> list[tuple[float, float, float, int]]:
    """(x, y, yaw, segment) per frame: walk each segment, turn on the spot at each corner (segment -1),
    pause at the end."""
    poses = []
    yaw = math.pi / 2  # facing north (+y)
    for i in range(len(walk.waypoints) - 1):
        (x0, y0), (x1, y1) = walk.waypoints[i], walk.waypoints[i + 1]
        steps = max(1, round(math.hypot(x1 - x0, y1 - y0) / cfg.speed))
        for k in range(steps):
            poses.append((x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps, yaw, i))
        if i < len(walk.turns):
            sign = -1 if walk.turns[i] == "right" else 1  # yaw grows counter-clockwise
            for k in range(cfg.turn_frames):
                poses.append((x1, y1, yaw + sign * (math.pi / 2) * k / cfg.turn_frames, -1))
            yaw += sign * math.pi / 2
    end = walk.waypoints[-1]
    poses += [(end[0], end[1], yaw, len(walk.turns))] * 3
    return poses


def _seen_in_sampled_frames(walk: Walk, poses: list[tuple[float, float, float, int]], cfg: RenderConfig) -> bool:
    """Whether the frames the recipe keeps (1 fps, then 8) show every segment and every landmark.

    A landmark counts as shown when its centre is on screen, in front of the walls, and at least
    8 pixels wide. Walks failing this are redrawn, so every question is answerable from 8 frames.
    """
    from stjax.data.video import MediaConfig, frame_plan

    indices, _ = frame_plan(len(poses), cfg.fps, MediaConfig())
    kept = [poses[i] for i in indices]
    if {p[3] for p in kept} < set(range(len(walk.turns) + 1)):
        return False
    for lm in walk.landmarks:
        shown = False
        for pose in kept:
            view = _View(walk, pose, cfg)
            depth, lateral = view.to_camera(lm.x, lm.y)
            if depth <= 0.2:
                continue
            col = int(cfg.width / 2 + lateral * view.focal / depth)
            width = 0.7 * view.focal / depth
            if 0 <= col < cfg.width and depth < view.wall_dist[col] and width >= 8:
                shown = True
                break
        if not shown:
            return False
    return True


# ----------------------------------------------------------------------------- rendering


def _sprite_mask(shape: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and shading of a billboard; u in [-1, 1] across, v in [0, 1] from top to bottom."""
    if shape == "cube":
        return np.ones_like(u, bool), np.where(u < 0.35, 1.0, 0.75) * np.where(v < 0.15, 1.15, 1.0)
    if shape == "cylinder":
        rim = 0.12 * np.sqrt(np.clip(1 - u**2, 0, 1))
        return (v >= 0.12 - rim) & (v <= 0.88 + rim), 0.55 + 0.45 * np.sqrt(np.clip(1 - u**2, 0, 1))
    if shape == "sphere":
        r2 = u**2 + (2 * v - 1) ** 2
        return r2 <= 1, 0.45 + 0.55 * np.sqrt(np.clip(1 - r2, 0, 1))
    if shape == "cone":
        return np.abs(u) <= v, 0.6 + 0.4 * (1 - np.abs(u))
    raise ValueError(shape)


class _View:
    """A camera at a pose: its axes, focal length, per-column rays and the wall distance per column."""

    def __init__(self, walk: Walk, pose: tuple[float, float, float, int], cfg: RenderConfig):
        self.px, self.py, yaw, _ = pose
        self.dx, self.dy = math.cos(yaw), math.sin(yaw)
        self.rx, self.ry = math.sin(yaw), -math.cos(yaw)  # right-hand direction
        tan = math.tan(math.radians(cfg.fov_degrees) / 2)
        self.focal = (cfg.width / 2) / tan
        screen = (2 * (np.arange(cfg.width) + 0.5) / cfg.width - 1) * tan  # per column, per unit forward
        self.ray_x, self.ray_y = self.dx + self.rx * screen, self.dy + self.ry * screen
        self.wall_dist, self.vertical = self._cast(walk.grid)

    def to_camera(self, x: float, y: float) -> tuple[float, float]:
        """(depth ahead, offset to the right) of a world point."""
        ox, oy = x - self.px, y - self.py
        return ox * self.dx + oy * self.dy, ox * self.rx + oy * self.ry

    def _cast(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid DDA for every column at once. The distance is perpendicular to the view plane (each ray
        has a unit forward part); `vertical` marks hits on x = const faces."""
        w = len(self.ray_x)
        map_x, map_y = np.full(w, math.floor(self.px)), np.full(w, math.floor(self.py))
        with np.errstate(divide="ignore"):
            delta_x, delta_y = np.abs(1 / self.ray_x), np.abs(1 / self.ray_y)
        step_x, step_y = np.where(self.ray_x < 0, -1, 1), np.where(self.ray_y < 0, -1, 1)
        side_x = np.where(self.ray_x < 0, self.px - map_x, map_x + 1 - self.px) * delta_x
        side_y = np.where(self.ray_y < 0, self.py - map_y, map_y + 1 - self.py) * delta_y
        hit = np.zeros(w, bool)
        wall_dist = np.full(w, np.inf)
        vertical = np.zeros(w, bool)
        rows, cols = grid.shape
        for _ in range(rows + cols):
            in_x = ~hit & (side_x < side_y)
            in_y = ~hit & ~(side_x < side_y)
            dist_now = np.where(in_x, side_x, side_y)
            map_x, side_x = np.where(in_x, map_x + step_x, map_x), np.where(in_x, side_x + delta_x, side_x)
            map_y, side_y = np.where(in_y, map_y + step_y, map_y), np.where(in_y, side_y + delta_y, side_y)
            inside = (map_x >= 0) & (map_x < cols) & (map_y >= 0) & (map_y < rows)
            wall = ~inside | (grid[np.clip(map_y, 0, rows - 1), np.clip(map_x, 0, cols - 1)] > 0)
            now = (in_x | in_y) & wall
            wall_dist = np.where(now, dist_now, wall_dist)
            vertical = np.where(now, in_x, vertical)
            hit |= now
            if hit.all():
                break
        return wall_dist, vertical


def _fog(colour: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Fade towards dark grey with distance, a depth cue."""
    keep = np.exp(-dist / 14)
    return colour * keep + 60 * (1 - keep)


def render(walk: Walk, pose: tuple[float, float, float, int], cfg: RenderConfig) -> np.ndarray:
    """One (H, W, 3) uint8 frame seen from pose = (x, y, yaw, segment)."""
    w, h = cfg.width, cfg.height
    view = _View(walk, pose, cfg)
    rows = np.arange(h)[:, None] + 0.5 - h / 2  # pixel row centres relative to the horizon

    # Floor (checkered, one tile per unit) and ceiling: a row below/above the horizon lies at a known distance.
    below = rows > 0
    dist = np.where(below, cfg.eye_height, 1 - cfg.eye_height) * view.focal / np.abs(rows)
    checker = (np.floor(view.px + dist * view.ray_x) + np.floor(view.py + dist * view.ray_y)) % 2
    floor = np.where(checker[..., None] > 0, [[[110, 100, 90]]], [[[150, 140, 125]]])
    image = _fog(np.where(below[..., None], floor, [[[200, 205, 215]]]), dist[..., None])

    # Walls: panels one unit wide with a dark seam, x-facing walls brighter than y-facing ones.
    along = np.where(view.vertical, view.py + view.wall_dist * view.ray_y, view.px + view.wall_dist * view.ray_x) % 1
    shade = np.where(view.vertical, 1.0, 0.8) * np.where(np.abs(along - 0.5) > 0.46, 0.6, 1.0)
    wall_colour = _fog(np.array(WALLS[walk.wall]) * shade[:, None], view.wall_dist[:, None])
    top = -(1 - cfg.eye_height) * view.focal / view.wall_dist
    bottom = cfg.eye_height * view.focal / view.wall_dist
    image = np.where(((rows >= top) & (rows < bottom))[..., None], wall_colour[None], image)

    # Landmarks, far to near, as shaded billboards standing on the floor, hidden behind nearer walls.
    cols = np.arange(w) + 0.5
    placed = [(*view.to_camera(lm.x, lm.y), lm) for lm in walk.landmarks]
    for depth, lateral, lm in sorted(placed, key=lambda p: -p[0]):
        if depth <= 0.2:
            continue
        colour_name, shape = lm.name.split()
        size = 0.7 if shape == "sphere" else 0.85  # height in world units; all are 0.7 wide
        scale = view.focal / depth
        u = (cols - (w / 2 + lateral * scale)) / (0.35 * scale)
        y_top, y_bottom = (cfg.eye_height - size) * scale, cfg.eye_height * scale
        v = (rows - y_top) / (y_bottom - y_top)
        in_box = (np.abs(u) <= 1)[None] & (v >= 0) & (v <= 1) & (depth < view.wall_dist)[None]
        if not in_box.any():
            continue
        mask, shading = _sprite_mask(shape, np.broadcast_to(u[None], in_box.shape), np.broadcast_to(v, in_box.shape))
        colour = _fog(np.array(COLOURS[colour_name]) * np.clip(shading, 0, 1.2)[..., None], np.float64(depth))
        image = np.where((in_box & mask)[..., None], colour, image)
    return np.clip(image, 0, 255).astype(np.uint8)


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 of an (H, W, 3) uint8 RGB frame, as PyAV's planar (H * 3/2, W) array.

    Chroma is taken from the mean RGB of each 2x2 block. Written out here so that the pixels handed to the
    encoder follow one formula rather than a libswscale version's code path.
    """
    h, w = frame.shape[:2]
    if h % 2 or w % 2:
        raise ValueError(f"YUV 4:2:0 needs an even frame size, got {w}x{h}")
    rgb = frame.astype(np.float64)
    block = rgb.reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    y = 16 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255
    u = 128 + (-37.797 * block[..., 0] - 74.203 * block[..., 1] + 112.0 * block[..., 2]) / 255
    v = 128 + (112.0 * block[..., 0] - 93.786 * block[..., 1] - 18.214 * block[..., 2]) / 255
    planes = [np.floor(p + 0.5).astype(np.uint8).reshape(-1) for p in (y, u, v)]  # all in [16, 240]
    return np.concatenate(planes).reshape(h * 3 // 2, w)


def write_video(frames: list[np.ndarray], path: Path, fps: int) -> None:
    """H.264 mp4 whose bytes depend only on the frames, in every process.

    x264's macroblock-tree rate control (`mbtree`, on in every preset that looks ahead) reads memory that
    was never written in its AVX-512 code: with glibc's MALLOC_PERTURB_ set to different fill values the
    same frames gave different files, and with mbtree off (or AVX-512 masked) identical ones. So mbtree is
    off, the encoder runs one thread, and the colour conversion is ours (BT.601, limited range, tagged
    so in the stream).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "23", "preset": "medium", "threads": "1", "x264-params": "mbtree=0"}
        stream.codec_context.thread_count = 1
        stream.codec_context.colorspace = 6  # AVCOL_SPC_SMPTE170M: BT.601
        stream.codec_context.color_range = 1  # AVCOL_RANGE_MPEG: limited (16-235 luma)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(frame), format="yuv420p")))
        container.mux(stream.encode())


# ----------------------------------------------------------------------------- questions


def _mirror(turn: str) -> str:
    return "right" if turn == "left" else "left"


def direction_steps(walk: Walk, direction: str) -> list[str]:
    """Going back: turn around, then the segments in reverse order with every turn mirrored."""
    if direction == "forward":
        turns = walk.turns
        steps = ["go straight"]
    else:
        turns = [_mirror(t) for t in reversed(walk.turns)]
        steps = ["turn around", "go straight"]
    for t in turns:
        steps += [f"turn {t}", "go straight"]
    return steps


def landmark_steps(walk: Walk, direction: str) -> list[str]:
    names = [lm.name for lm in walk.landmarks]
    return names if direction == "forward" else names[::-1]


def action_steps(walk: Walk, direction: str) -> list[str]:
    """Per segment: walk past its landmarks (or walk straight), then the turn; stop at the end."""
    segments = []
    for seg in range(len(walk.turns) + 1):
        names = [f"the {lm.name}" for lm in walk.landmarks if lm.segment == seg]
        segments.append(names)
    turns = list(walk.turns)
    steps = []
    if direction == "reverse":
        segments = [s[::-1] for s in reversed(segments)]
        turns = [_mirror(t) for t in reversed(turns)]
        steps.append("turn around")
    for i, names in enumerate(segments):
        steps.append("walk past " + " and ".join(names) if names else "walk straight")
        if i < len(turns):
            steps.append(f"turn {turns[i]}")
    steps.append("stop at the destination" if direction == "forward" else "stop at the starting point")
    return steps


def colour_steps(walk: Walk, direction: str) -> list[str]:
    """The colour of the landmark nearest the start: passed first going forward, last going back."""
    return [walk.landmarks[0].name.split()[0]]


def wall_steps(walk: Walk, direction: str) -> list[str]:
    return [walk.wall]


STEPS = {
    "direction": direction_steps,
    "landmark": landmark_steps,
    "action": action_steps,
    "colour": colour_steps,
    "walls": wall_steps,
}


def _sentence(steps: list[str]) -> str:
    text = ", ".join(steps)
    return text[0].upper() + text[1:]


def _distractors(walk: Walk, task: str, direction: str, rng: np.random.Generator) -> list[list[str]]:
    """Wrong step lists: the opposite direction's answer, mirrored turns, shuffles, random routes."""
    right = STEPS[task](walk, direction)
    if task == "colour":
        unseen = [c for c in COLOURS if all(c != lm.name.split()[0] for lm in walk.landmarks)]
        return [[str(c)] for c in rng.choice(unseen, size=3, replace=False)]
    other = "reverse" if direction == "forward" else "forward"
    candidates = [STEPS[task](walk, other)]
    mirror = {"turn left": "turn right", "turn right": "turn left"}
    candidates.append([mirror.get(s, s) for s in right])
    for _ in range(20):
        candidates.append([right[i] for i in rng.permutation(len(right))])
    if task == "landmark":
        unseen = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in right]
        for _ in range(20):
            swap = list(right)
            swap[int(rng.integers(len(swap)))] = str(rng.choice(unseen))
            candidates.append(swap)
    else:
        for _ in range(20):
            fake = Walk(
                walk.grid, walk.waypoints, [str(rng.choice(["left", "right"])) for _ in walk.turns], walk.landmarks
            )
            candidates.append(STEPS[task](fake, direction))
            fake.turns = fake.turns + [str(rng.choice(["left", "right"]))]
            candidates.append(STEPS[task](fake, direction))
    out: list[list[str]] = []
    for c in candidates:
        if c != right and c not in out:
            out.append(c)
        if len(out) == 3:
            return out
    raise RuntimeError("could not find three distinct wrong options")


@dataclass
class Question:
    task: str
    direction: str
    question: str  # Ego-ST style: header + short question + "?"
    options: list[str]
    answer: str
    answer_text: str


def make_question(walk: Walk, task: str, direction: str, rng: np.random.Generator, gold: int) -> Question:
    """The question with its right answer at option `gold` (0: A) and the wrong ones shuffled around it;
    the walls question lists the paints in WALLS' order (its gold is the walk's paint)."""
    right = STEPS[task](walk, direction)
    if task == "walls":
        choices, gold = [[paint] for paint in WALLS], list(WALLS).index(walk.wall)
    else:
        wrong = _distractors(walk, task, direction, rng)
        choices = [wrong[j] for j in rng.permutation(3)]
        choices.insert(gold, right)
    options = [f"{chr(65 + i)}. {_sentence(c)}" for i, c in enumerate(choices)]
    return Question(
        task, direction, HEADER + QUESTIONS[task, direction] + "?", options, chr(65 + gold), _sentence(right)
    )


def gold_positions(n: int, seed: int, keys: list[tuple[str, str]]) -> dict[tuple[str, str], list[int]]:
    """For each (task, direction), the right option's position for walks 0..n-1: every block of 4 walks
    holds each letter once (a permutation drawn from the seed), so no letter is favoured and a model that
    always answers one letter scores chance on every file of 4k walks."""
    blocks = [np.random.default_rng([seed, 2**32 + b]) for b in range(-(-n // 4))]
    return {key: [int(p) for rng in blocks for p in rng.permutation(4)][:n] for key in keys}


def reverse_thinking_solution(asked: Question, opposite: Question) -> str:
    """The release's long-CoT template: restate and answer the opposite question, then answer this one."""
    think_word = "reverse" if asked.direction == "forward" else "forward"
    return (
        f"<think>Let's start by thinking {think_word} {QUESTIONS[opposite.task, opposite.direction]}? "
        f"{opposite.answer_text} And then think about {QUESTIONS[asked.task, asked.direction]}? "
        f"Hence, the correct answer is {asked.answer}</think> <answer>{asked.answer}</answer>"
    )


# ----------------------------------------------------------------------------- the data set


def contact_sheet(videos: list[Path], captions: list[str], path: Path) -> None:
    """The 8 frames the recipe keeps for each video, one row per video, with a caption line."""
    from stjax.data.video import MediaConfig, read_video

    rows = []
    for video, caption in zip(videos, captions):
        clip = read_video(str(video), MediaConfig(min_pixels=0, max_pixels=224 * 224))
        strip = np.concatenate(list(clip.frames), axis=1)
        band = Image.new("RGB", (strip.shape[1], 44), "white")
        ImageDraw.Draw(band).multiline_text((4, 2), caption, fill="black")
        rows += [np.asarray(band), strip]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    Image.fromarray(np.concatenate(rows)).save(path, optimize=False)


def generate(
    out: str | Path,
    n: int,
    seed: int,
    cfg: RenderConfig = RenderConfig(),
    sheet: int = 3,
    tasks: tuple[str, ...] = TASKS,
) -> Path:
    """n walks, with a forward and a reverse question of each task about each (one file per task and direction)."""
    unknown = sorted(set(tasks) - set(STEPS))
    if unknown or not tasks:
        raise ValueError(f"synthetic tasks {unknown or '(none)'}: choose from {', '.join(STEPS)}")
    out = Path(out)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    egost: dict[tuple[str, str], dict] = {(t, d): {} for t in tasks for d in ("forward", "reverse")}
    golds = gold_positions(n, seed, list(egost))
    st_rows, plain, texts, videos, captions = [], [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        name = f"walk_{i:04d}"
        walk = make_walk(rng)
        while not _seen_in_sampled_frames(walk, camera_path(walk, cfg), cfg):
            walk = make_walk(rng)
        if ("walls", "forward") in golds:  # the paint is the walls question's gold: balanced as the letters
            walk.wall = list(WALLS)[golds["walls", "forward"][i]]
        video = out / "synth" / f"{name}.mp4"
        write_video([render(walk, pose, cfg) for pose in camera_path(walk, cfg)], video, cfg.fps)
        videos.append(video)
        scene = {
            "waypoints": walk.waypoints,
            "turns": walk.turns,
            "landmarks": [vars(lm) for lm in walk.landmarks],
            "wall": walk.wall,
            "grid": walk.grid.tolist(),
        }
        (out / "scenes" / f"{name}.json").write_text(json.dumps(scene))
        questions = {key: make_question(walk, *key, rng, golds[key][i]) for key in egost}
        captions.append(
            f"{name}: turns {', '.join(walk.turns)}\nlandmarks: {', '.join(lm.name for lm in walk.landmarks)}"
        )
        for (task, direction), q in questions.items():
            other = questions[task, "reverse" if direction == "forward" else "forward"]
            egost[task, direction][name] = {
                "video": f"{name}.mp4",
                f"{direction}_mcq": {"question": q.question, "options": q.options, "answer": q.answer},
            }
            solution = reverse_thinking_solution(q, other)
            problem = release_problem(q.question, q.options)
            st_rows.append(
                {
                    "problem": problem,
                    "solution": solution,
                    "video": f"synth/{name}.mp4",
                    "original_question": problem,
                    "original_answer": q.answer,
                }
            )
            sample = Sample(
                id=f"{name}:{task}:{direction}",
                video=str(video),
                question=q.question,
                options=q.options,
                answer=q.answer,
                task=task,
                direction=direction,
                pair_id=f"{name}:{task}:{'reverse' if direction == 'forward' else 'forward'}",
                solution=solution,
                problem=problem,
            )
            plain.append(sample)
            texts += [user_text(sample, t) for t in ("seed_mcq", "grpo", "sft")] + [solution]
    for (task, direction), records in egost.items():
        path = out / f"Synth_{direction}_{FILE_SUFFIX[task]}.json"
        path.write_text(json.dumps(records, indent=1) + "\n")
    with (out / "st_r1_synth.jsonl").open("w") as f:
        for row in st_rows:
            f.write(json.dumps(row) + "\n")
    texts += ["system\nYou are a helpful assistant.", "user\n", "assistant\n"]
    build_tokenizer(texts, out / "tokenizer", vocab_size=3000)
    if sheet:
        contact_sheet(videos[:sheet], captions[:sheet], out / "contact_sheet.png")
    write_plain_jsonl(plain, out / "plain.jsonl")  # last: the runs take this file as the mark of a complete set
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=16, help="number of walks (6 questions each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("W", "H"))
    parser.add_argument("--fps", type=int, default=5)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(STEPS))
    args = parser.parse_args()
    cfg = RenderConfig(width=args.size[0], height=args.size[1], fps=args.fps)
    out = generate(args.out, args.n, args.seed, cfg, tasks=tuple(args.tasks))
    print(f"wrote {args.n} walks ({2 * len(args.tasks) * args.n} questions) to {out}")


if __name__ == "__main__":
    main()
