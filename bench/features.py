"""Benchmark of regional feature extraction and of the participant workflow's overhead.

Run from the repository root::

    python bench/features.py            # both parts
    python bench/features.py --part extraction
    python bench/features.py --part workflow

Part 1 (extraction), on a 1 mm MNI-sized image (197 x 233 x 189: nilearn's ICBM 2009
grey-matter template saved as a float32 ``.nii.gz``) with the 100-region 1 mm default atlas,
medians over repeated runs in one process of

a. the I/O floor: nibabel load + decompress of the image and the atlas;
b. fednipype's extraction end to end from files (TSV + JSON written), cold (caches cleared:
   atlas read again) and warm (atlas cached, as in a long-running worker);
c. nilearn's ``NiftiLabelsMasker`` computing the same region means from the same files.

It prints b/a, c/b and the peak traced memory of b relative to the image's float64 array.

Part 2 (workflow), on the bundled siteB (30 subjects, 3 mm maps), then on a synthetic site of
25 subjects with 1 mm maps (realistic per-subject work): the participant workflow with Nipype's
Linear and MultiProc (2 processes) plugins against a plain Python loop over the same images
calling the library; it prints the per-subject Nipype overhead ((workflow - loop) / n).
Every line includes the BIDS query, so the difference is Nipype's own cost.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

os.environ.setdefault("NIPYPE_NO_ET", "1")

import nibabel as nb
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"b/a": 1.3, "c/b": 3.0, "peak": 3.0, "overhead_s": 0.3}


def _interleaved_medians(funcs: dict, repeats: int, before: dict | None = None) -> dict:
    """Median wall time of each function, runs interleaved so load drifts hit all alike.

    ``before[name]`` (untimed) runs before each timed call of ``name``.
    """
    times: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(repeats):
        for name, func in funcs.items():
            if before and name in before:
                before[name]()
            start = time.perf_counter()
            func()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _clear_caches() -> None:
    from fednipype import grids, images

    for cached in (
        grids._load_atlas_cached,
        grids._atlas_on_grid_cached,
        grids._read_label_table_cached,
        images._sha256_cached,
    ):
        cached.cache_clear()
    gc.collect()


def bench_extraction(repeats: int) -> dict[str, float]:
    from nilearn import datasets
    from nilearn.maskers import NiftiLabelsMasker

    from fednipype.atlas import default_atlas
    from fednipype.features import extract_features, write_features

    tmp = Path(tempfile.mkdtemp(prefix="fednipype-bench-"))
    try:
        template = datasets.load_mni152_gm_template(resolution=1)
        data = np.asarray(template.get_fdata(), dtype=np.float32)
        img = nb.Nifti1Image(data, template.affine)
        img.header.set_data_dtype(np.float32)
        image = tmp / "sub-bench_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz"
        img.to_filename(image)
        atlas = default_atlas(1)
        float64_mb = np.prod(data.shape) * 8 / 1e6
        print(
            f"image {data.shape} float32 .nii.gz ({image.stat().st_size / 1e6:.1f} MB on disk, "
            f"{float64_mb:.0f} MB as float64); atlas {atlas.image.name}"
        )

        def io_floor():
            np.asarray(nb.load(image).dataobj)
            np.asarray(nb.load(atlas.image).dataobj)

        def fednipype_run():
            result = extract_features(image, atlas.image, atlas.labels)
            write_features(result, tmp / "out_features.tsv")

        def nilearn_run():
            masker = NiftiLabelsMasker(labels_img=str(atlas.image), strategy="mean")
            return masker.fit_transform(str(image))

        io_floor(), fednipype_run()  # warm the OS file cache and imports
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            means = nilearn_run().ravel()
            med = _interleaved_medians(
                {"a": io_floor, "b_cold": fednipype_run, "b_warm": fednipype_run},
                repeats,
                before={"a": gc.collect, "b_cold": _clear_caches, "b_warm": gc.collect},
            )
            med["c"] = _interleaved_medians({"c": nilearn_run}, max(3, repeats // 2))["c"]
        a, b_cold, b_warm, c = med["a"], med["b_cold"], med["b_warm"], med["c"]
        ours = extract_features(image, atlas.image, atlas.labels).table["mean"].to_numpy()
        max_diff = float(np.max(np.abs(ours - means)))

        peaks = {}
        for label, func, prepare in (
            ("io", io_floor, gc.collect),
            ("cold", fednipype_run, _clear_caches),
            ("warm", fednipype_run, fednipype_run),
        ):
            prepare()
            tracemalloc.start()
            func()
            peaks[label] = tracemalloc.get_traced_memory()[1] / 1e6
            tracemalloc.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"(a) I/O floor, load + decompress image and atlas : {a * 1e3:7.1f} ms")
    print(f"(b) fednipype end to end, cold (atlas read)     : {b_cold * 1e3:7.1f} ms")
    print(f"    fednipype end to end, warm (atlas cached)   : {b_warm * 1e3:7.1f} ms")
    print(f"(c) nilearn NiftiLabelsMasker, same means       : {c * 1e3:7.1f} ms")
    print(f"    max |mean difference| fednipype vs nilearn  : {max_diff:.2e}")
    print(
        f"b/a = {b_cold / a:.2f} cold, {b_warm / a:.2f} warm (target <= {TARGETS['b/a']}); "
        f"c/b = {c / b_cold:.1f} cold, {c / b_warm:.1f} warm (target >= {TARGETS['c/b']})"
    )
    print(
        f"peak traced memory: fednipype {peaks['cold']:.0f} MB cold = "
        f"{peaks['cold'] / float64_mb:.2f}x, {peaks['warm']:.0f} MB warm = "
        f"{peaks['warm'] / float64_mb:.2f}x the float64 image (target <= {TARGETS['peak']}x); "
        f"I/O floor {peaks['io']:.0f} MB = {peaks['io'] / float64_mb:.2f}x"
    )
    return {"a": a, "b_cold": b_cold, "b_warm": b_warm, "c": c}


def make_1mm_site(root: Path, n_subjects: int = 25) -> Path:
    """A minimal BIDS site whose GM maps are 1 mm MNI float32 images (realistic per-subject work).

    Each subject's map is nilearn's 1 mm ICBM grey-matter template times a subject factor, so
    every file differs; raw T1w entries are small placeholders (copies of a bundled one).
    """
    import json

    from nilearn import datasets

    site = root / "site1mm"
    seg = site / "derivatives" / "segmentation"
    seg.mkdir(parents=True)
    description = {"Name": "synthetic 1 mm site", "BIDSVersion": "1.9.0", "DatasetType": "raw"}
    (site / "dataset_description.json").write_text(json.dumps(description))
    seg_description = {
        "Name": "segmentation",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bench"}],
    }
    (seg / "dataset_description.json").write_text(json.dumps(seg_description))
    rows = ["participant_id\tage\tsex\tgroup"]
    template = datasets.load_mni152_gm_template(resolution=1)
    gm = np.asarray(template.get_fdata(), dtype=np.float32)
    t1w = REPO / "bids_examples" / "siteB" / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    for i in range(1, n_subjects + 1):
        sub = f"sub-{i:02d}"
        rows.append(f"{sub}\t{40 + i}\tF\tcontrol")
        (site / sub / "anat").mkdir(parents=True)
        shutil.copy(t1w, site / sub / "anat" / f"{sub}_T1w.nii.gz")
        img = nb.Nifti1Image(gm * np.float32(0.8 + 0.004 * i), template.affine)
        img.header.set_data_dtype(np.float32)
        name = f"{sub}_space-MNI152NLin2009cAsym_label-GM_probseg.nii.gz"
        (seg / sub / "anat").mkdir(parents=True)
        img.to_filename(seg / sub / "anat" / name)
    (site / "participants.tsv").write_text("\n".join(rows) + "\n")
    return site


def bench_workflow(repeats: int, site: str = "siteB") -> dict[str, float]:
    from nipype import config
    from nipype import logging as nipype_logging

    from fednipype.bids import collect_probseg_maps
    from fednipype.cli.participant import run_participant_wf
    from fednipype.features import extract_features, write_features

    config.set("logging", "workflow_level", "CRITICAL")
    nipype_logging.update_logging(config)
    logging.getLogger("fednipype").setLevel(logging.CRITICAL)

    tmp = Path(tempfile.mkdtemp(prefix="fednipype-bench-wf-"))
    bids_dir = make_1mm_site(tmp) if site == "1mm" else REPO / "bids_examples" / site
    counter = iter(range(10**6))

    def fresh() -> Path:
        return tmp / f"run{next(counter)}"

    def loop():
        out = fresh()
        for job in collect_probseg_maps(bids_dir):
            result = extract_features(job.path, *_atlas_files())
            write_features(result, out / f"{job.key}_desc-regional_features.tsv")

    def workflow(plugin, plugin_args=None, poll=None):
        root = fresh()
        result = run_participant_wf(
            bids_dir=bids_dir,
            output_dir=root / "fednipype",
            work_dir=root / "work",
            plugin=plugin,
            plugin_args=plugin_args,
            poll_sleep_duration=poll,
        )
        assert result.ok and len(result.outputs) == result.n_jobs, result.failures
        return root

    n = len(collect_probseg_maps(bids_dir))
    mp2 = {"n_procs": 2}
    try:
        loop()  # imports and OS file cache
        med = _interleaved_medians(
            {
                "query": lambda: collect_probseg_maps(bids_dir),
                "loop": loop,
                "Linear": lambda: workflow("Linear"),
                "MultiProc": lambda: workflow("MultiProc", mp2),
                "MultiProc, poll 0.1 s": lambda: workflow("MultiProc", mp2, poll=0.1),
            },
            repeats,
        )
        root = workflow("MultiProc", mp2)
        start = time.perf_counter()
        run_participant_wf(
            bids_dir=bids_dir,
            output_dir=root / "fednipype",
            work_dir=root / "work",
            plugin="MultiProc",
            plugin_args=mp2,
        )
        cached = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    what = "synthetic site of 1 mm float32 GM maps" if site == "1mm" else site
    print(
        f"{what}: {n} images, median of {repeats} interleaved runs; every line includes the "
        f"BIDS query ({med['query']:.2f} s)"
    )
    print(f"plain Python loop calling the library      : {med['loop']:6.2f} s")
    for label in ("Linear", "MultiProc", "MultiProc, poll 0.1 s"):
        overhead = (med[label] - med["loop"]) / n
        print(
            f"workflow, {label + (' (2 procs)' if 'Multi' in label else ''):<32} : "
            f"{med[label]:6.2f} s   Nipype overhead {overhead:+.3f} s/subject "
            f"(target <= {TARGETS['overhead_s']})"
        )
    run = {k: med[k] - med["query"] for k in ("Linear", "MultiProc")}
    print(
        f"MultiProc / Linear = {med['MultiProc'] / med['Linear']:.2f} with the query, "
        f"{run['MultiProc'] / run['Linear']:.2f} without (target < 1); "
        f"re-run from Nipype's cache (MultiProc): {cached:.2f} s"
    )
    return med


def _atlas_files():
    from fednipype.atlas import default_atlas

    atlas = default_atlas(2)
    return atlas.image, atlas.labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=["all", "extraction", "workflow", "workflow-1mm"], default="all"
    )
    parser.add_argument("--repeats", type=int, default=7, help="runs per timing (extraction)")
    parser.add_argument("--wf-repeats", type=int, default=3, help="runs per workflow timing")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, load average {load} (other processes slow every timing)")
    if args.part in ("all", "extraction"):
        bench_extraction(args.repeats)
    if args.part in ("all", "workflow"):
        bench_workflow(args.wf_repeats)
    if args.part in ("all", "workflow-1mm"):
        bench_workflow(args.wf_repeats, site="1mm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
