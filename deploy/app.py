"""MONAI Deploy application of the cranial_implant_pcdiff bundle: defective skulls (mask or CT) -> implants.

Two graphs (Holoscan operators, run once), chosen by the input: mask / CT files, or a DICOM CT series
(an input folder without .nrrd/.nii/.nii.gz files):

    MaskLoaderOperator  --masks-->  ImplantInferenceOperator

    DICOMDataLoaderOperator --> DICOMSeriesSelectorOperator --> SliceGeometryOperator --> DICOMSeriesToVolumeOperator
        --> VolumeFileOperator --masks--> ImplantInferenceOperator --implant, folder--> DICOMSegmentationWriterOperator
                                          (the selected series also goes to the SEG writer)

* ``MaskLoaderOperator`` lists the .nrrd/.nii/.nii.gz files of the input folder (or the one input
  file) and checks every header, so a bad file fails before minutes of diffusion sampling.
* The SDK's DICOM operators load the series folder, select the first CT series and turn it into a
  volume in Hounsfield units; ``VolumeFileOperator`` writes it as a NIfTI CT (RAS affine) into a work
  folder, named by its SeriesInstanceUID if that is a valid DICOM UID, else by a hash of it (a tag is data,
  never a path).
* ``SliceGeometryOperator`` refuses a series whose slices are sheared (gantry tilt), which the SDK would
  load into an orthogonal, wrong geometry (``scripts.dicom``).
* ``ImplantInferenceOperator`` parses the bundle's ``configs/inference.json`` with MONAI's
  ``ConfigParser``, sets ``input`` / ``output_dir`` (and any command-line overrides) and evaluates
  the config's ``run`` expression, so the app builds the networks, the sampler and the
  ``ImplantGenerator`` exactly as the bundle job does and writes the same files:
  ``<output>/<case>/implant.nrrd`` (input grid and format), STL, preview, ``summary.json`` (and
  ``skull_mask`` for a CT). For a DICOM series it passes the implant on to the SDK's
  ``DICOMSegmentationWriterOperator``, which writes ``<output>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``,
  a DICOM SEG that references the CT series.

The bundle is found next to this file (``deploy/..``) when the app runs from the repository, or
under the model path (``-m`` / ``HOLOSCAN_MODEL_PATH``) when the bundle folder is packaged as the
app's model, as in a MONAI Application Package. Usage (see deploy/README.md)::

    python deploy/app.py -i <input folder or file> -o <output folder> [-m <bundle folder>] [-l DEBUG]
        [--preset small_mirror] [--num_samples 1] [--sampler ddim] [--steps 10] [--eta 0] [--seed 0] [--device cpu]
        [--input_type auto|mask|ct] [--bone_threshold_hu 150] [--max_input_voxels N]
        [--denoiser_weights FILE] [--voxelizer_weights FILE] [--strict_weights]
        [--overwrite] [--no-stl] [--no-preview] [--no-progress]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, ConditionType, Fragment, Image, Operator, OperatorSpec
from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
from monai.deploy.operators.dicom_seg_writer_operator import DICOMSegmentationWriterOperator, SegmentDescription
from monai.deploy.operators.dicom_series_selector_operator import DICOMSeriesSelectorOperator
from monai.deploy.operators.dicom_series_to_volume_operator import DICOMSeriesToVolumeOperator
from pydicom.sr.codedict import codes

CONFIG = Path("configs") / "inference.json"
# deploy/app.py inside the bundle: the bundle root is the folder above deploy/.
APP_BUNDLE = Path(__file__).resolve().parents[1]

logger = logging.getLogger("cranial_implant_pcdiff.deploy")


def bundle_version(root: Path) -> str:
    """The bundle's version, from its ``configs/metadata.json`` (the app's version is the bundle's). In a MAP the
    app sits alone in /opt/holoscan/app and the bundle is its model, under ``HOLOSCAN_MODEL_PATH``."""
    if not (root / "configs" / "metadata.json").is_file() and "HOLOSCAN_MODEL_PATH" in os.environ:
        root = find_bundle(os.environ["HOLOSCAN_MODEL_PATH"])
    return json.loads((root / "configs" / "metadata.json").read_text())["version"]

# The DICOM series the app works on: the first CT series of each study.
CT_SERIES_RULES = '{"selections": [{"name": "CT Series", "conditions": {"Modality": "(?i)CT"}}]}'
DICOM_VOLUME_SUFFIX = ".nii.gz"  # the selected series goes to the bundle job as a NIfTI CT (RAS affine)


def find_bundle(path: str | os.PathLike) -> Path:
    """The bundle folder: ``path`` itself or the shallowest folder at most two levels below it that
    holds configs/inference.json (a packager may nest the model folder). Raises FileNotFoundError."""
    path = Path(path).resolve()
    for depth in range(3):
        found = sorted(f for f in path.glob("*/" * depth + CONFIG.as_posix()) if f.is_file())
        if found:
            return found[0].parents[1]
    raise FileNotFoundError(f"{path}: no cranial_implant_pcdiff bundle ({CONFIG} not found up to two levels down)")


def parse_overrides(argv: list[str]) -> tuple[dict, list[str]]:
    """Split ``argv`` (``argv[0]`` = program) into overrides of inference.json keys and the rest,
    which goes to the SDK's parser (-i/-o/-m/-w/-l) and Holoscan. Only given options are returned."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset")
    parser.add_argument("--num_samples", type=int)
    parser.add_argument("--sampler")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eta", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device")
    parser.add_argument("--input_type", choices=["auto", "mask", "ct"])
    parser.add_argument("--bone_threshold_hu", type=float)
    parser.add_argument("--max_input_voxels", type=int)
    parser.add_argument("--denoiser_weights", type=lambda p: str(Path(p).resolve()))
    parser.add_argument("--voxelizer_weights", type=lambda p: str(Path(p).resolve()))
    parser.add_argument("--strict_weights", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-stl", dest="stl", action="store_false")
    parser.add_argument("--no-preview", dest="preview", action="store_false")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--no-mirror-prior", dest="mirror_prior", action="store_false")
    parser.add_argument("--no-shell-prior", dest="shell_prior", action="store_false")
    parser.add_argument("--no-prior-fill", dest="prior_fill", action="store_false")
    parser.add_argument("--no-mirrored-openings", dest="mirrored_openings", action="store_false")
    overrides, rest = parser.parse_known_args(argv[1:])
    return vars(overrides), argv[:1] + rest


def import_bundle(root: Path) -> None:
    """Make the bundle's ``scripts`` package importable (configs say ``$import scripts``)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


class MaskLoaderOperator(Operator):
    """Input folder or file -> list of mask / CT paths whose headers were checked.

    Output port ``masks``: ``list[pathlib.Path]``, sorted; every file's header is read and its
    geometry checked (``scripts.io.read_header_geometry``), without loading voxels. A bad file is
    logged and passed on (the job lists it as failed and goes on with the others); when no file is
    readable the operator fails at once with every file's problem.
    """

    def __init__(self, fragment: Fragment, *args, input_path: Path, **kwargs):
        self.input_path = Path(input_path)
        super().__init__(fragment, *args, **kwargs)  # the SDK needs attributes set first

    def setup(self, spec: OperatorSpec):
        spec.output("masks")

    def compute(self, op_input, op_output, context):
        from scripts.cases import list_inputs
        from scripts.io import MaskError, read_header_geometry

        masks, problems = list_inputs(self.input_path), []
        for path in masks:
            try:
                shape, spacing = read_header_geometry(path)
            except MaskError as err:
                problems.append(str(err))
                logger.error("input %s", err)
                continue
            logger.info("input %s: shape %s, spacing %s mm", path.name, shape, spacing)
        if len(problems) == len(masks):
            raise MaskError("; ".join(problems))
        op_output.emit(masks, "masks")


class ImplantInferenceOperator(Operator):
    """Masks or CTs -> implants written to the output folder by the bundle's own inference job.

    Input port ``masks``: ``list[pathlib.Path]``. The job is the ``run`` expression of
    ``<bundle>/configs/inference.json`` with ``bundle_root``, ``input``, ``output_dir`` and the
    given overrides set; its per-case summaries are logged.
    With ``emit_implant``, output ports ``implant`` (SDK ``Image``, uint8 (D, H, W) as the DICOM
    series-to-volume operator lays out the CT) and ``folder`` (the case's output folder) carry the
    first case's implant on to a DICOM SEG writer; a case skipped because its results exist emits nothing.
    """

    def __init__(self, fragment: Fragment, *args, bundle_root: Path, output_path: Path, overrides: dict,
                 emit_implant: bool = False, **kwargs):
        self.bundle_root = Path(bundle_root)
        self.output_path = Path(output_path)
        self.overrides = dict(overrides)
        self.emit_implant = emit_implant
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("masks")
        if self.emit_implant:
            spec.output("implant").condition(ConditionType.NONE)
            spec.output("folder").condition(ConditionType.NONE)

    def compute(self, op_input, op_output, context):
        from monai.bundle import ConfigParser

        masks = op_input.receive("masks")
        parser = ConfigParser()
        parser.read_config(str(self.bundle_root / CONFIG))
        parser.update({"bundle_root": str(self.bundle_root), "input": [str(p) for p in masks],
                       "output_dir": str(self.output_path), **self.overrides})
        try:
            parser.get_parsed_content("run")
        except RuntimeError as err:  # ConfigExpression wraps the job's own error: surface that one
            if err.__cause__ is None:
                raise
            raise err.__cause__ from None
        report = json.loads((self.output_path / "summary.json").read_text())
        for s in report["cases"]:
            logger.info("%s: implant %d voxels (%.2f ml), %.1f s -> %s", s["case_id"], s["implant_voxels"],
                        s["implant_volume_ml"], s["timings_s"]["total"], self.output_path / s["case_id"])
        new = [s for s in report["cases"] if s["case_id"] not in report["skipped"]]
        if self.emit_implant and new:
            from scripts.io import load_mask

            folder = self.output_path / new[0]["case_id"]
            implant = load_mask(folder / f"implant{DICOM_VOLUME_SUFFIX}")  # (1, W, H, D), the CT file's layout
            op_output.emit(Image(np.ascontiguousarray(np.asarray(implant[0]).transpose(2, 1, 0))), "implant")
            op_output.emit(folder, "folder")


class SliceGeometryOperator(Operator):
    """Refuses a selected DICOM series whose slices are sheared (gantry tilt; ``scripts.dicom``) before
    ``DICOMSeriesToVolumeOperator`` would load it into an orthogonal, wrong geometry; passes the
    ``study_selected_series_list`` on unchanged otherwise."""

    def setup(self, spec: OperatorSpec):
        spec.input("study_selected_series_list")
        spec.output("study_selected_series_list")

    def compute(self, op_input, op_output, context):
        from scripts.dicom import check_slice_geometry
        from scripts.paths import uid_name

        selections = op_input.receive("study_selected_series_list")
        for study in selections:
            for selected in study.selected_series:
                slices = [s.get_native_sop_instance() for s in selected.series.get_sop_instances()]
                check_slice_geometry(slices[0].ImageOrientationPatient, [s.ImagePositionPatient for s in slices],
                                     f"DICOM series {uid_name(selected.series.SeriesInstanceUID)}")
        op_output.emit(selections, "study_selected_series_list")


class VolumeFileOperator(Operator):
    """DICOM series volume -> a NIfTI CT file for the bundle job.

    Input port ``image``: SDK ``Image`` from ``DICOMSeriesToVolumeOperator`` ((D, H, W) in HU, RAS
    ``affine`` for the (W, H, D) order in its metadata). Output port ``masks``: ``[path]`` of
    ``<work folder>/<SeriesInstanceUID>.nii.gz`` (a UID that is not a valid DICOM UID is replaced by
    ``uid_<hash>``, see ``scripts.paths.uid_name``; int16 if the HU are integers, else float32). The
    work folder is removed when the app stops.
    """

    def setup(self, spec: OperatorSpec):
        spec.input("image")
        spec.output("masks")

    def start(self):
        self.work = tempfile.TemporaryDirectory(prefix="pcdiff_dicom_")

    def stop(self):
        self.work.cleanup()

    def compute(self, op_input, op_output, context):
        from scripts.io import save_mask
        from scripts.paths import inside, uid_name

        image = op_input.receive("image")
        volume = np.asarray(image.asnumpy()).transpose(2, 1, 0)
        meta = image.metadata()
        dtype = np.int16 if np.issubdtype(volume.dtype, np.integer) else np.float32
        work = Path(self.work.name)  # the UID is untrusted DICOM data: a valid UID or a hash, never a path
        path = save_mask(inside(work, work / f"{uid_name(meta['SeriesInstanceUID'])}{DICOM_VOLUME_SUFFIX}"), volume,
                         meta["affine"], dtype=dtype)
        logger.info("DICOM series %r (%r) -> %s: %s voxels, HU %g..%g", meta["SeriesInstanceUID"],
                    meta.get("SeriesDescription", ""), path.name, volume.shape, volume.min(), volume.max())
        op_output.emit([path], "masks")


def is_dicom_input(path: Path) -> bool:
    """True for a folder that holds no .nrrd/.nii/.nii.gz file (then it is read as DICOM, sub-folders included);
    the files looked at are the ones ``scripts.cases.list_inputs`` would take."""
    from scripts.io import MASK_SUFFIXES

    return path.is_dir() and not any(p.is_file() and p.name.lower().endswith(MASK_SUFFIXES) for p in path.iterdir())


def implant_segment() -> SegmentDescription:
    """The DICOM SEG segment of the implant (SNOMED CT: category "Physical object", type "Implant")."""
    return SegmentDescription(segment_label="Cranial implant", segmented_property_category=codes.SCT.PhysicalObject,
                              segmented_property_type=codes.SCT.Implant, algorithm_name=CranialImplantApp.name,
                              algorithm_version=CranialImplantApp.version)


class CranialImplantApp(Application):
    """Patient-specific cranial implants from defective skulls (point-cloud diffusion, PCDiff).

    Args:
        overrides: values for keys of configs/inference.json (``preset``, ``steps``, weights, ...).
    """

    name = "cranial_implant_pcdiff"
    description = ("Defective skull mask or CT (.nrrd/.nii.gz, or a DICOM CT series) -> implant mask, DICOM SEG, "
                   "STL and preview (PCDiff).")
    version = bundle_version(APP_BUNDLE)

    def __init__(self, *args, overrides: dict | None = None, **kwargs):
        self.overrides = dict(overrides or {})
        super().__init__(*args, **kwargs)

    def compose(self):
        context: AppContext = Application.init_app_context(self.argv)
        explicit_model = "model" in context.args or "HOLOSCAN_MODEL_PATH" in os.environ
        root = find_bundle(context.model_path if explicit_model else APP_BUNDLE)
        import_bundle(root)
        input_path, output_path = Path(context.input_path).resolve(), Path(context.output_path).resolve()
        dicom = is_dicom_input(input_path)
        logger.info("bundle %s, input %s (%s), output %s", root, input_path,
                    "DICOM series folder" if dicom else "mask / CT files", output_path)
        inference = ImplantInferenceOperator(self, bundle_root=root, output_path=output_path, overrides=self.overrides,
                                             emit_implant=dicom, name="implant_inference")
        if not dicom:
            loader = MaskLoaderOperator(self, CountCondition(self, 1), input_path=input_path, name="mask_loader")
            self.add_flow(loader, inference, {("masks", "masks")})
            return
        loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path, name="dicom_loader")
        selector = DICOMSeriesSelectorOperator(self, rules=CT_SERIES_RULES, name="series_selector")
        geometry = SliceGeometryOperator(self, name="slice_geometry")
        to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
        to_file = VolumeFileOperator(self, name="volume_file")
        seg_writer = DICOMSegmentationWriterOperator(self, segment_descriptions=[implant_segment()],
                                                     output_folder=output_path, name="dicom_seg_writer")
        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, geometry, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(geometry, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, to_file, {("image", "image")})
        self.add_flow(to_file, inference, {("masks", "masks")})
        self.add_flow(inference, seg_writer, {("implant", "seg_image"), ("folder", "output_folder")})
        self.add_flow(selector, seg_writer, {("study_selected_series_list", "study_selected_series_list")})


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)  # the app's options; Holoscan then prints its own and exits
    overrides, sdk_argv = parse_overrides(argv)
    # Holoscan expects [interpreter, script, args...] and drops the interpreter from ``self.argv``.
    CranialImplantApp([sys.executable, *sdk_argv], overrides=overrides).run()


if __name__ == "__main__":
    main()
