"""Frame reading / writing and the video_generation.py script (folders of frames; PyAV when installed)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dino.errors import UserError
from dino.eval.video import FrameFolderWriter, list_frame_files, open_frame_writer, open_frames, render_attention_video
from dino.eval.visualization import demo_image
from dino.hub import save_backbone
from dino.models import build_backbone

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=64, num_heads=4, depth=2)


def video_script():
    spec = importlib.util.spec_from_file_location("video_generation", REPO / "video_generation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 16, num_register_tokens=2, **TINY).eval()


def write_frames(folder: Path, count: int, size: tuple[int, int] = (32, 48), suffix: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"frame{i}{suffix}" for i in range(count)]
    for i, path in enumerate(paths):
        demo_image(size, seed=i).save(path)
    return paths


@pytest.fixture(scope="module")
def saved_backbone(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "backbone.pth"
    save_backbone(tiny_model(), path, dict(arch="vit_tiny", patch_size=16, num_register_tokens=2, **TINY))
    return str(path)


def test_frame_files_are_in_natural_order(tmp_path):
    write_frames(tmp_path, 11)
    (tmp_path / "notes.txt").write_text("not a frame")
    names = [Path(p).name for p in list_frame_files(tmp_path)]
    assert names == [f"frame{i}.png" for i in range(11)]  # frame2 before frame10
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no image frames"):
        list_frame_files(tmp_path / "empty")


def test_render_writes_one_overlay_per_frame(tmp_path):
    write_frames(tmp_path / "frames", 5, size=(40, 60))
    source = open_frames(tmp_path / "frames")
    assert source.num_frames == 5 and source.fps is None
    count = render_attention_video(
        tiny_model(),
        source,
        tmp_path / "out",
        torch.device("cpu"),
        resize=32,
        keep_fraction=0.6,
        batch_size=2,
        progress=False,
    )
    written = sorted((tmp_path / "out").iterdir())
    assert count == 5 and [p.name for p in written] == [f"frame-{i:06d}.png" for i in range(5)]
    with Image.open(written[0]) as frame:
        assert frame.size == (48, 32)  # shorter side 32, rounded to patch multiples


def test_video_generation_cli_on_a_folder_of_frames(tmp_path, saved_backbone):
    write_frames(tmp_path / "frames", 4, suffix=".jpg")
    count = video_script().main(
        [
            "--input_path",
            str(tmp_path / "frames"),
            "--output_path",
            str(tmp_path / "overlays"),
            "--pretrained_weights",
            saved_backbone,
            "--device",
            "cpu",
        ]
    )
    assert count == 4 and len(list((tmp_path / "overlays").glob("frame-*.png"))) == 4


def test_video_generation_rejects_bad_input(tmp_path, saved_backbone):
    script = video_script()
    with pytest.raises(UserError, match="does not exist"):
        script.main(["--input_path", str(tmp_path / "missing"), "--pretrained_weights", saved_backbone])
    with pytest.raises(UserError, match="input_path is required"):
        script.main(["--pretrained_weights", saved_backbone])
    write_frames(tmp_path / "frames", 1)
    with pytest.raises(UserError, match="threshold"):
        script.main(["--input_path", str(tmp_path / "frames"), "--threshold", "0"])


def test_video_files_without_pyav_say_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail, as when it is not installed
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match=r"dino\[video\]"):
        open_frames(tmp_path / "clip.mp4")
    with pytest.raises(UserError, match=r"dino\[video\]"):
        open_frame_writer(tmp_path / "out.mp4", fps=10)
    assert isinstance(open_frame_writer(tmp_path / "frames-out", fps=10), FrameFolderWriter)


def test_video_file_round_trip_with_pyav(tmp_path, saved_backbone):
    pytest.importorskip("av")
    write_frames(tmp_path / "frames", 6)
    script = video_script()
    clip = tmp_path / "overlay.mp4"
    assert (
        script.main(
            [
                "--input_path",
                str(tmp_path / "frames"),
                "--output_path",
                str(clip),
                "--fps",
                "5",
                "--pretrained_weights",
                saved_backbone,
                "--device",
                "cpu",
            ]
        )
        == 6
    )
    source = open_frames(clip)
    assert source.fps == pytest.approx(5.0)
    frames = list(source.frames)
    assert len(frames) == 6 and frames[0].size == (48, 32)
    assert (
        script.main(
            [
                "--input_path",
                str(clip),
                "--output_path",
                str(tmp_path / "again"),
                "--pretrained_weights",
                saved_backbone,
                "--device",
                "cpu",
            ]
        )
        == 6
    )
