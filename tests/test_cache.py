"""The uint8 image cache, built from real PNG files on disk."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _cache_fixtures import (
    BARRIER_ENV,
    EXIT_ENV,
    HOLD_ENV,
    TESTS_DIR,
    PngFolderSource,
    child_view,
    make_png_folder,
    structured_image,
    write_png,
)
from cxrtune.data.cache import (
    IMAGES_FILE,
    REPORT_FILE,
    FlatImageWarning,
    ImageCache,
    build_cache,
    cache_root,
    cache_summary,
    find_caches,
    format_bytes,
    get_cache,
)
from cxrtune.data.imageio import load_grey_square
from cxrtune.errors import ConfigError, DataError

SIZE = 32


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("CXRTUNE_CACHE", str(root))
    return root


@pytest.fixture
def pngs(tmp_path):
    folder = tmp_path / "pngs"
    make_png_folder(folder, n=12)
    return folder


def _digest(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


def _entries(cache_env: Path) -> list[str]:
    folder = cache_env / PngFolderSource.name
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _assert_matches_decoder(cache: ImageCache, fit: str = "crop") -> None:
    for row in cache.index.itertuples():
        expected = load_grey_square(row.path, cache.size, fit)
        np.testing.assert_array_equal(cache.images[row.cache_row], expected, err_msg=row.image_id)


def _truncate_png(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _run_build_subprocess(folder: Path, cache_env: Path, extra_env: dict[str, str],
                          workers: int = 1) -> subprocess.Popen:
    code = (
        "import json, sys\n"
        "from _cache_fixtures import PngFolderSource\n"
        "from cxrtune.data.cache import build_cache\n"
        f"cache = build_cache(PngFolderSource(sys.argv[1]), size={SIZE}, workers={workers}, progress=False)\n"
        "print(json.dumps({'path': str(cache.path), 'build_id': cache.report['build_id']}))\n"
    )
    env = dict(os.environ, CXRTUNE_CACHE=str(cache_env), **extra_env)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-c", code, str(folder)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# -- content --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_cache_holds_the_decoder_output_for_8_16_bit_rgb_and_rgba(pngs, cache_env, fit):
    source = PngFolderSource(pngs)
    cache = build_cache(source, size=SIZE, fit=fit, workers=1, progress=False)

    assert cache.images.shape == (12, SIZE, SIZE) and cache.images.dtype == np.uint8
    assert len(cache) == 12 and cache.size == SIZE and cache.fit == fit
    assert cache.path.parent == (cache_env / source.name).resolve()
    assert cache.path.name.endswith(f"-s{SIZE}-{fit}")
    assert list(cache.index["image_id"]) == list(source.build_index()["image_id"])
    assert list(cache.index["cache_row"]) == list(range(12))
    _assert_matches_decoder(cache, fit)
    # 16-bit raw values 900..3400 clip to a flat 255 when cast naively; min-max scaling keeps contrast
    for row in cache.index.iloc[1::4].itertuples():
        assert np.ptp(cache.images[row.cache_row]) >= 150, row.image_id
    on_disk = json.loads((cache.path / REPORT_FILE).read_text())
    assert on_disk["n"] == 12 and on_disk["shape"] == [12, SIZE, SIZE] and on_disk["skipped"] == []
    assert (cache.path / IMAGES_FILE).stat().st_size == 12 * SIZE * SIZE


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE", str(tmp_path / "here"))
    assert cache_root() == tmp_path / "here"
    monkeypatch.delenv("CXRTUNE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "cxrtune"


def test_two_workers_write_the_same_bytes_as_one(tmp_path, cache_env):
    folder = tmp_path / "pngs"
    make_png_folder(folder, n=20, seed=3)
    _truncate_png(folder / "img_007.png")  # failures come back from the workers and are compacted
    source = PngFolderSource(folder)

    serial = build_cache(source, size=SIZE, workers=1, cache_dir=tmp_path / "serial", progress=False)
    parallel = build_cache(source, size=SIZE, workers=2, cache_dir=tmp_path / "parallel", progress=False)

    assert parallel.report["workers"] == 2 and serial.report["workers"] == 1
    for report in (serial.report, parallel.report):
        assert report["steady_images_per_second"] > 0 and report["cpu_ms_per_image"] > 0
        assert 0 <= report["startup_seconds"] <= report["decode_seconds"] <= report["build_seconds"]
    assert len(parallel) == len(serial) == 19
    assert (parallel.path / IMAGES_FILE).read_bytes() == (serial.path / IMAGES_FILE).read_bytes()
    assert parallel.index.drop(columns="labels").equals(serial.index.drop(columns="labels"))
    assert [s["image_id"] for s in parallel.report["skipped"]] == ["img_007.png"]
    _assert_matches_decoder(parallel)


# -- reuse and invalidation ---------------------------------------------------------------------------


def test_second_call_reuses_the_cache_without_decoding(pngs, cache_env, monkeypatch):
    source = PngFolderSource(pngs)
    first = build_cache(source, size=SIZE, workers=1, progress=False)
    calls = []
    monkeypatch.setattr(PngFolderSource, "read_images", lambda self, *a, **k: calls.append(1))

    again = build_cache(source, size=SIZE, workers=1, progress=False)
    via_name = get_cache(PngFolderSource.name, pngs, size=SIZE, progress=False)

    assert calls == []
    assert again.path == first.path == via_name.path
    assert again.report["build_id"] == first.report["build_id"] == via_name.report["build_id"]


def test_a_different_size_is_a_different_cache(pngs, cache_env):
    source = PngFolderSource(pngs)
    small = build_cache(source, size=16, workers=1, progress=False)
    large = build_cache(source, size=SIZE, workers=1, progress=False)
    assert small.path != large.path and small.images.shape == (12, 16, 16)
    assert small.fingerprint == large.fingerprint


def test_changing_or_adding_an_image_builds_a_new_cache(pngs, cache_env):
    source = PngFolderSource(pngs)
    old = build_cache(source, size=SIZE, workers=1, progress=False)

    rng = np.random.default_rng(99)
    changed = pngs / "img_003.png"
    write_png(changed, structured_image(rng, 50, 41, "L"))
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # even on coarse-mtime disks
    rewritten = build_cache(source, size=SIZE, workers=1, progress=False)

    assert rewritten.fingerprint != old.fingerprint and rewritten.path != old.path
    row = int(rewritten.rows_for(["img_003.png"])[0])
    np.testing.assert_array_equal(rewritten.images[row], load_grey_square(changed, SIZE))
    assert not np.array_equal(rewritten.images[row], old.images[row])

    write_png(pngs / "img_100.png", structured_image(rng, 40, 40, "L"))
    grown = build_cache(source, size=SIZE, workers=1, progress=False)
    assert len(grown) == 13 and grown.path not in (old.path, rewritten.path)
    _assert_matches_decoder(grown)
    assert len(find_caches(PngFolderSource.name)) == 3  # older caches stay usable until removed


# -- bad input ----------------------------------------------------------------------------------------


def test_corrupt_and_truncated_pngs_are_skipped_and_listed(pngs, cache_env):
    _truncate_png(pngs / "img_004.png")
    (pngs / "img_009.png").write_bytes(b"this is not a PNG file")
    cache = build_cache(PngFolderSource(pngs), size=SIZE, workers=1, progress=False)

    assert len(cache) == 10 and cache.images.shape == (10, SIZE, SIZE)
    assert "img_004.png" not in set(cache.index["image_id"])
    assert list(cache.index["cache_row"]) == list(range(10))
    _assert_matches_decoder(cache)
    skipped = {s["image_id"]: s for s in cache.report["skipped"]}
    assert sorted(skipped) == ["img_004.png", "img_009.png"]
    assert str(pngs / "img_004.png") in skipped["img_004.png"]["reason"]
    assert skipped["img_009.png"]["path"] == str(pngs / "img_009.png")
    assert cache.report["counts"] == {"listed": 12, "cached": 10, "skipped": 2, "missing": 0, "unreadable": 2,
                                     "flagged": 0}
    with pytest.raises(DataError, match="img_004.png.*skipped"):
        cache.rows_for(["img_000.png", "img_004.png"])
    with pytest.raises(DataError, match="strict=True.*skipped 2"):
        build_cache(PngFolderSource(pngs), size=SIZE, strict=True, progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_strict_fails_naming_the_file_and_leaves_no_cache(pngs, cache_env, workers):
    _truncate_png(pngs / "img_005.png")
    with pytest.raises(DataError, match=r"img_005\.png.*strict=True"):
        build_cache(PngFolderSource(pngs), size=SIZE, workers=workers, strict=True, progress=False)
    assert find_caches() == [] and _entries(cache_env) == []


def test_missing_image_fails_before_decoding_unless_allowed(pngs, cache_env):
    source = PngFolderSource(pngs)
    index = source.build_index()
    (pngs / "img_002.png").unlink()

    with pytest.raises(DataError, match=r"1 of 12 indexed images are missing.*img_002\.png"):
        build_cache(source, index=index, size=SIZE, workers=1, progress=False)
    assert find_caches() == [] and _entries(cache_env) == []

    cache = build_cache(source, index=index, size=SIZE, workers=1, progress=False, allow_missing=True)
    assert len(cache) == 11 and cache.report["counts"]["missing"] == 1
    assert cache.report["skipped"][0]["kind"] == "missing"
    assert cache.report["skipped"][0]["image_id"] == "img_002.png"
    _assert_matches_decoder(cache)


def test_every_image_unreadable_is_an_error(tmp_path, cache_env):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(3):
        (folder / f"img_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="none of the 3 indexed images could be read"):
        build_cache(PngFolderSource(folder), size=SIZE, workers=1, progress=False)
    assert _entries(cache_env) == []


def test_one_pixel_and_constant_images_are_kept_warned_and_listed(pngs, cache_env):
    write_png(pngs / "img_dot.png", np.full((1, 1), 200, np.uint8))
    write_png(pngs / "img_flat.png", np.full((40, 52), 77, np.uint8))
    flat = r"2 cached image\(s\) have every pixel equal.*img_dot\.png.*img_flat\.png"
    with pytest.warns(FlatImageWarning, match=flat):
        cache = build_cache(PngFolderSource(pngs), size=SIZE, workers=1, progress=False)

    assert len(cache) == 14  # kept: they decode; only unreadable files are skipped
    flagged = {f["image_id"]: f for f in cache.report["flagged"]}
    assert sorted(flagged) == ["img_dot.png", "img_flat.png"] and cache.report["counts"]["flagged"] == 2
    assert flagged["img_dot.png"]["reason"] == "the file is 1 x 1 px and holds one pixel"
    assert flagged["img_flat.png"]["reason"] == "the file is 52 x 40 px and every pixel has the same value"
    assert flagged["img_flat.png"]["path"] == str(pngs / "img_flat.png")
    for image_id in flagged:
        assert not cache.images[cache.rows_for([image_id])[0]].any()  # cached flat black
    assert json.loads((cache.path / REPORT_FILE).read_text())["flagged"] == cache.report["flagged"]
    assert "flagged  2 image(s) with every pixel equal" in cache_summary(cache)
    assert "flagged" not in cache_summary(build_cache(PngFolderSource(pngs), size=16, workers=1, progress=False,
                                                      index=PngFolderSource(pngs).build_index().iloc[:3]))


@pytest.mark.parametrize("free, needed_text, free_text", [
    (0, "12 KB", "0 bytes"),
    (410, "12 KB", "410 bytes"),
    (5_300, "12 KB", "5.3 KB"),
    (12_000, "12,288 bytes", "12,000 bytes"),  # both "12 KB": the exact counts show the gap
])
def test_a_full_disk_is_refused_with_sizes_in_readable_units(pngs, cache_env, monkeypatch, free, needed_text,
                                                              free_text):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))
    with pytest.raises(DataError, match=rf"the image cache needs {needed_text} in .* but only {free_text} are free; "
                                        "free some space or point CXRTUNE_CACHE"):
        build_cache(PngFolderSource(pngs), size=SIZE, workers=1, progress=False)  # 12 x 32 x 32 bytes
    assert find_caches() == []


def test_byte_counts_use_the_unit_that_shows_them():
    cases = {0: "0 bytes", 1: "1 byte", 999: "999 bytes", 1000: "1.0 KB", 410_000: "410 KB", 999_600: "1.0 MB",
             3_200_000: "3.2 MB", 12_300_000_000: "12 GB", 7_000_000_000_000: "7.0 TB"}
    assert {n: format_bytes(n) for n in cases} == cases


def test_bad_settings_name_the_field(pngs, cache_env):
    source = PngFolderSource(pngs)
    with pytest.raises(ConfigError, match="size = 4"):
        build_cache(source, size=4, progress=False)
    with pytest.raises(ConfigError, match="fit = 'stretch'.*'crop'"):
        build_cache(source, fit="stretch", progress=False)
    with pytest.raises(ConfigError, match="workers = 0"):
        build_cache(source, workers=0, progress=False)


# -- atomicity ----------------------------------------------------------------------------------------


def test_an_interrupted_build_leaves_nothing_and_the_next_succeeds(pngs, cache_env, monkeypatch):
    calls = []
    original = PngFolderSource.read_images

    def interrupted(self, rows, size, fit="crop"):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, rows, size, fit)

    monkeypatch.setattr(PngFolderSource, "read_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(PngFolderSource(pngs), size=SIZE, workers=1, progress=False)
    assert _entries(cache_env) == []

    monkeypatch.setattr(PngFolderSource, "read_images", original)
    cache = build_cache(PngFolderSource(pngs), size=SIZE, workers=1, progress=False)
    _assert_matches_decoder(cache)


def test_a_killed_build_never_looks_complete_and_is_cleaned_up(pngs, cache_env):
    proc = _run_build_subprocess(pngs, cache_env, {EXIT_ENV: "2"})
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err

    leftovers = _entries(cache_env)
    partial = [name for name in leftovers if ".partial-" in name and not name.endswith(".lock")]
    assert len(partial) == 1, leftovers  # the dead build's folder, never renamed
    assert find_caches() == []
    with pytest.raises(DataError, match="not a complete image cache"):
        ImageCache.open(cache_env / PngFolderSource.name / partial[0])

    cache = build_cache(PngFolderSource(pngs), size=SIZE, workers=1, progress=False)
    _assert_matches_decoder(cache)
    assert _entries(cache_env) == [cache.path.name]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"  # an unreaped zombie has exited


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_workers_of_a_killed_builder_exit(tmp_path, pngs, cache_env):
    hold = tmp_path / "hold"
    hold.mkdir()
    proc = _run_build_subprocess(pngs, cache_env, {HOLD_ENV: str(hold)}, workers=2)
    worker_pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(worker_pids) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            worker_pids = [int(p.name.split("-")[1]) for p in hold.glob("pid-*")]
        assert len(worker_pids) == 2, proc.stderr.read() if proc.poll() is not None else "workers never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in worker_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in worker_pids)
    finally:
        for pid in worker_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.stdout.close()
        proc.stderr.close()
    assert find_caches() == []
    cache = build_cache(PngFolderSource(pngs), size=SIZE, workers=1, progress=False)
    assert _entries(cache_env) == [cache.path.name]


def test_concurrent_builders_end_with_one_cache(tmp_path, pngs, cache_env):
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_run_build_subprocess(pngs, cache_env, {BARRIER_ENV: str(barrier)}) for _ in range(2)]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out.strip().splitlines()[-1]))

    assert len(list(barrier.glob("ready-*"))) == 2  # both were decoding at the same time
    assert outputs[0] == outputs[1]  # the loser of the rename opened the winner's cache
    assert _entries(cache_env) == [Path(outputs[0]["path"]).name]
    _assert_matches_decoder(ImageCache.open(outputs[0]["path"]))


# -- opening and sharing ------------------------------------------------------------------------------


def test_images_are_read_only(pngs, cache_env):
    cache = build_cache(PngFolderSource(pngs), size=SIZE, workers=1, progress=False)
    before = cache.images[0].copy()
    assert isinstance(cache.images, np.memmap) and not cache.images.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        cache.images[0, 0, 0] = 1
    np.testing.assert_array_equal(ImageCache.open(cache.path).images[0], before)


def test_a_truncated_images_file_is_reported_on_open(pngs, cache_env):
    source = PngFolderSource(pngs)
    cache = build_cache(source, size=SIZE, workers=1, progress=False)
    images_file = cache.path / IMAGES_FILE
    os.truncate(images_file, images_file.stat().st_size - 100)

    with pytest.raises(DataError, match=rf"{IMAGES_FILE} holds {12 * SIZE * SIZE - 100:,} bytes.*damaged"):
        ImageCache.open(cache.path)
    with pytest.raises(DataError, match="rebuild=True"):
        build_cache(source, size=SIZE, workers=1, progress=False)

    rebuilt = build_cache(source, size=SIZE, workers=1, progress=False, rebuild=True)
    assert rebuilt.path == cache.path
    _assert_matches_decoder(rebuilt)


def test_not_a_cache_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=f"{REPORT_FILE} is missing"):
        ImageCache.open(tmp_path)


def test_pickle_sends_the_path_and_a_child_maps_the_same_bytes(tmp_path, cache_env):
    folder = tmp_path / "pngs"
    make_png_folder(folder, n=8, shape=(80, 80))
    cache = build_cache(PngFolderSource(folder), size=64, workers=1, progress=False)

    blob = pickle.dumps(cache)
    assert len(blob) < 500 < cache.images.nbytes // 50  # the path, not 8 x 64 x 64 pixels
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        seen = pool.apply(child_view, (cache,))

    assert seen == {
        "type": "memmap",
        "filename": str((cache.path / IMAGES_FILE).resolve()),
        "mode": "r",
        "writeable": False,
        "sha256": _digest(cache.images),
        "first_id": "img_000.png",
    }


def test_a_handle_pickled_before_a_rebuild_refuses_to_open(pngs, cache_env):
    source = PngFolderSource(pngs)
    blob = pickle.dumps(build_cache(source, size=SIZE, workers=1, progress=False))
    build_cache(source, size=SIZE, workers=1, progress=False, rebuild=True)
    with pytest.raises(DataError, match="rebuilt after this handle was made"):
        pickle.loads(blob)


def test_rows_for_maps_ids_to_cache_rows(pngs, cache_env):
    cache = build_cache(PngFolderSource(pngs), size=SIZE, workers=1, progress=False)
    rows = cache.rows_for(["img_010.png", "img_001.png", "img_010.png"])
    assert rows.dtype == np.int64 and list(rows) == [10, 1, 10]
    np.testing.assert_array_equal(cache.images[rows[1]], load_grey_square(pngs / "img_001.png", SIZE))
    with pytest.raises(DataError, match="'nope.png'.*not in the cached index"):
        cache.rows_for(["img_001.png", "nope.png"])


def test_find_caches_and_summary(pngs, cache_env):
    _truncate_png(pngs / "img_000.png")
    cache = build_cache(PngFolderSource(pngs), size=SIZE, workers=1, progress=False)
    assert find_caches() == [cache.path] == find_caches(PngFolderSource.name)
    assert find_caches("nih") == []

    text = cache_summary(cache)
    assert PngFolderSource.name in text and str(pngs) in text
    assert "11 cached of 12 indexed, 1 skipped" in text
    assert f"{SIZE} x {SIZE} px" in text and str(cache.path) in text
    assert f"{11 * SIZE * SIZE / 2**20:,.1f} MB" in text
    assert cache_summary(cache.path) == text  # a folder from find_caches works too

    os.truncate(cache.path / IMAGES_FILE, 10)
    damaged = cache_summary(cache.path)
    assert str(cache.path) in damaged and "unusable" in damaged and "holds 10 bytes" in damaged


def test_compaction_moves_long_runs_like_fancy_indexing(tmp_path):
    # runs longer than the copy block, a skipped first row and a skipped last row
    from cxrtune.data.cache_build import compact

    rng = np.random.default_rng(5)
    shape = (700, 8, 8)
    original = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / IMAGES_FILE
    path.write_bytes(original.tobytes())
    dropped = {0, 1, 300, 301, 302, 650, 699}
    kept = np.array([i for i in range(shape[0]) if i not in dropped], dtype=np.int64)

    compact(path, shape, kept)

    assert path.stat().st_size == len(kept) * 64
    compacted = np.fromfile(path, dtype=np.uint8).reshape(len(kept), 8, 8)
    np.testing.assert_array_equal(compacted, original[kept])


def test_a_source_returning_wrong_arrays_is_named(pngs, cache_env, monkeypatch):
    monkeypatch.setattr(PngFolderSource, "read_images",
                        lambda self, rows, size, fit="crop": [np.zeros((size, size + 1), np.uint8)] * len(rows))
    with pytest.raises(DataError, match=r"uint8 array of shape \(32, 33\) for image 'img_000.png'.*\(32, 32\)"):
        build_cache(PngFolderSource(pngs), size=SIZE, workers=1, progress=False)
    assert _entries(cache_env) == []


def _hold_lock_in_another_process(lock: Path) -> subprocess.Popen:
    """A process that takes ``lock`` as a build does and keeps it until killed or its stdin closes."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from cxrtune.data.cache_disk import hold_lock, release_lock\n"
        "lock = hold_lock(Path(sys.argv[1]))\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
        "release_lock(lock)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "held":
        proc.kill()
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"the lock holder did not start: {line!r} {err}")
    return proc


def test_cleanup_spares_a_live_build_and_removes_a_dead_one(tmp_path):
    from cxrtune.data.cache_disk import lock_path, remove_abandoned

    live = tmp_path / "abc-s32-crop.partial-live"
    live_lock = lock_path(live)
    holder = _hold_lock_in_another_process(live_lock)
    try:
        # a build takes its lock before it makes its folder: the lock alone is spared too
        assert remove_abandoned(tmp_path) == [] and list(tmp_path.iterdir()) == [live_lock]
        live.mkdir()
        dead = tmp_path / "abc-s32-crop.partial-dead"
        dead.mkdir()
        lock_path(dead).touch()  # its owner died: nobody holds the lock
        orphan = lock_path(tmp_path / "abc-s32-crop.partial-gone")
        orphan.touch()  # a dead build's lock whose folder is already gone
        replaced = tmp_path / "abc-s32-crop.stale-old"
        replaced.mkdir()

        removed = remove_abandoned(tmp_path)
        assert sorted(p.name for p in removed) == [dead.name, replaced.name]
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, live_lock.name]
        assert remove_abandoned(tmp_path) == []
    finally:
        holder.kill()  # as a killed build dies: the lock file stays, held by nobody
        holder.communicate(timeout=30)
    assert live_lock.exists()
    assert remove_abandoned(tmp_path) == [live] and list(tmp_path.iterdir()) == []


def test_a_partial_folder_without_a_lock_file_is_removed_once_old(tmp_path):
    from cxrtune.data.cache_disk import _ABANDONED_AFTER_S, remove_abandoned

    partial = tmp_path / "abc-s32-crop.partial-nolock"
    partial.mkdir()
    assert remove_abandoned(tmp_path) == [] and partial.is_dir()  # its owner may have lost its lock file

    old = time.time() - _ABANDONED_AFTER_S - 60
    os.utime(partial, (old, old))
    assert remove_abandoned(tmp_path) == [partial] and list(tmp_path.iterdir()) == []


def test_a_finished_lock_holder_leaves_no_lock_file(tmp_path):
    from cxrtune.data.cache_disk import lock_held

    lock = tmp_path / "abc-s32-crop.partial-x.lock"
    holder = _hold_lock_in_another_process(lock)
    try:
        assert lock_held(lock)
    finally:
        _, err = holder.communicate(input="", timeout=30)
    assert holder.returncode == 0, err
    assert not lock.exists() and not lock_held(lock) and not lock.exists()  # probing creates no file


def test_default_workers_decode_small_builds_in_process(pngs, cache_env):
    from cxrtune.data.cache import SMALL_BUILD_ROWS, CacheConfig

    cache = build_cache(PngFolderSource(pngs), size=SIZE, progress=False)
    assert cache.report["workers"] == 1  # 12 images: spawning workers would cost more than it saves
    assert CacheConfig().resolved_workers(SMALL_BUILD_ROWS) == min(2, os.cpu_count() or 1)
    assert CacheConfig(workers=3).resolved_workers(5) == 3
