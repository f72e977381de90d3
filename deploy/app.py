"""MONAI Deploy application of the cranial_implant_pcdiff bundle: defective-skull masks -> implants.

Graph (Holoscan operators, run once):

    MaskLoaderOperator  --masks-->  ImplantInferenceOperator

* ``MaskLoaderOperator`` lists the .nrrd/.nii/.nii.gz masks of the input folder (or the one input
  file) and checks every header, so a bad file fails before minutes of diffusion sampling.
* ``ImplantInferenceOperator`` parses the bundle's ``configs/inference.json`` with MONAI's
  ``ConfigParser``, sets ``input`` / ``output_dir`` (and any command-line overrides) and evaluates
  the config's ``run`` expression, so the app builds the networks, the sampler and the
  ``ImplantGenerator`` exactly as the bundle job does and writes the same files:
  ``<output>/<case>/implant.nrrd`` (input grid and format), STL, preview, ``summary.json``.

The bundle is found next to this file (``deploy/..``) when the app runs from the repository, or
under the model path (``-m`` / ``HOLOSCAN_MODEL_PATH``) when the bundle folder is packaged as the
app's model, as in a MONAI Application Package. Usage (see deploy/README.md)::

    python deploy/app.py -i <input folder or file> -o <output folder> [-m <bundle folder>] [-l DEBUG]
        [--preset small] [--num_samples 1] [--sampler ddim] [--steps 50] [--eta 0] [--seed 0] [--device cpu]
        [--denoiser_weights FILE] [--voxelizer_weights FILE]
        [--overwrite] [--no-stl] [--no-preview] [--no-progress]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, Operator, OperatorSpec

CONFIG = Path("configs") / "inference.json"
# deploy/app.py inside the bundle: the bundle root is the folder above deploy/.
APP_BUNDLE = Path(__file__).resolve().parents[1]

logger = logging.getLogger("cranial_implant_pcdiff.deploy")


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
    parser.add_argument("--denoiser_weights", type=lambda p: str(Path(p).resolve()))
    parser.add_argument("--voxelizer_weights", type=lambda p: str(Path(p).resolve()))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-stl", dest="stl", action="store_false")
    parser.add_argument("--no-preview", dest="preview", action="store_false")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    overrides, rest = parser.parse_known_args(argv[1:])
    return vars(overrides), argv[:1] + rest


def import_bundle(root: Path) -> None:
    """Make the bundle's ``scripts`` package importable (configs say ``$import scripts``)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))


class MaskLoaderOperator(Operator):
    """Input folder or file -> validated list of mask paths.

    Output port ``masks``: ``list[pathlib.Path]``, sorted; every file's header was read and its
    geometry checked (``scripts.io.read_header_geometry``), without loading voxels.
    """

    def __init__(self, fragment: Fragment, *args, input_path: Path, **kwargs):
        self.input_path = Path(input_path)
        super().__init__(fragment, *args, **kwargs)  # the SDK needs attributes set first

    def setup(self, spec: OperatorSpec):
        spec.output("masks")

    def compute(self, op_input, op_output, context):
        from scripts.inference import list_inputs
        from scripts.io import read_header_geometry

        masks = list_inputs(self.input_path)
        for path in masks:
            shape, spacing = read_header_geometry(path)
            logger.info("input %s: shape %s, spacing %s mm", path.name, shape, spacing)
        op_output.emit(masks, "masks")


class ImplantInferenceOperator(Operator):
    """Masks -> implants written to the output folder by the bundle's own inference job.

    Input port ``masks``: ``list[pathlib.Path]``. The job is the ``run`` expression of
    ``<bundle>/configs/inference.json`` with ``bundle_root``, ``input``, ``output_dir`` and the
    given overrides set; its per-case summaries are logged.
    """

    def __init__(self, fragment: Fragment, *args, bundle_root: Path, output_path: Path, overrides: dict, **kwargs):
        self.bundle_root = Path(bundle_root)
        self.output_path = Path(output_path)
        self.overrides = dict(overrides)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("masks")

    def compute(self, op_input, op_output, context):
        from monai.bundle import ConfigParser

        masks = op_input.receive("masks")
        parser = ConfigParser()
        parser.read_config(str(self.bundle_root / CONFIG))
        parser.update({"bundle_root": str(self.bundle_root), "input": [str(p) for p in masks],
                       "output_dir": str(self.output_path), **self.overrides})
        try:
            summaries = parser.get_parsed_content("run")[0]
        except RuntimeError as err:  # ConfigExpression wraps the job's own error: surface that one
            if err.__cause__ is None:
                raise
            raise err.__cause__ from None
        for s in summaries:
            logger.info("%s: implant %d voxels (%.2f ml), %.1f s -> %s", s["case_id"], s["implant_voxels"],
                        s["implant_volume_ml"], s["timings_s"]["total"], self.output_path / s["case_id"])


class CranialImplantApp(Application):
    """Patient-specific cranial implants from defective-skull masks (point-cloud diffusion, PCDiff).

    Args:
        overrides: values for keys of configs/inference.json (``preset``, ``steps``, weights, ...).
    """

    name = "cranial_implant_pcdiff"
    description = "Defective skull mask (.nrrd/.nii.gz) -> implant mask, STL and preview (PCDiff)."
    version = "0.1.0"

    def __init__(self, *args, overrides: dict | None = None, **kwargs):
        self.overrides = dict(overrides or {})
        super().__init__(*args, **kwargs)

    def compose(self):
        context: AppContext = Application.init_app_context(self.argv)
        explicit_model = "model" in context.args or "HOLOSCAN_MODEL_PATH" in os.environ
        root = find_bundle(context.model_path if explicit_model else APP_BUNDLE)
        import_bundle(root)
        logger.info("bundle %s, input %s, output %s", root, context.input_path, context.output_path)
        loader = MaskLoaderOperator(self, CountCondition(self, 1), input_path=Path(context.input_path).resolve(),
                                    name="mask_loader")
        inference = ImplantInferenceOperator(self, bundle_root=root, output_path=Path(context.output_path).resolve(),
                                             overrides=self.overrides, name="implant_inference")
        self.add_flow(loader, inference, {("masks", "masks")})


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(__doc__)  # the app's options; Holoscan then prints its own and exits
    overrides, sdk_argv = parse_overrides(argv)
    # Holoscan expects [interpreter, script, args...] and drops the interpreter from ``self.argv``.
    CranialImplantApp([sys.executable, *sdk_argv], overrides=overrides).run()


if __name__ == "__main__":
    main()
