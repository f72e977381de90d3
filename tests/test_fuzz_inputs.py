"""Seeded, bounded fuzzing of the input layer: mutated NRRD and NIfTI files through ``scripts.ct.LoadSkulld`` (the
inference config's loader) and random DICOM UID strings through ``scripts.paths.uid_name``.

Every case must end in a skull mask or a one-line MaskError / ValueError / OSError naming the file, within
CASE_SECONDS, and write nothing. DICOM files themselves are parsed by the MONAI Deploy SDK (pydicom) in the
Deploy app's own venv; what reaches the bundle from them is tag strings, fuzzed here.
"""

import os
import random
import signal
import zlib

import numpy as np
import pytest

from scripts.ct import LoadSkulld
from scripts.io import save_mask
from scripts.paths import inside, safe_name, uid_name

SEED, CASES_PER_FORMAT, CASE_SECONDS = 40, 120, 10
MAX_VOXELS = 1_000_000  # a lowered limit: a mutated size field must not make a case slow
FORMATS = (".nrrd", ".nii", ".nii.gz")
NRRD_VALUES = {
    "sizes": ["16 16", "16 16 16 16", "0 16 16", "-16 16 16", "100000 100000 100000", "16 16 1e9", "a b c", "16 16 17"],
    "type": ["float", "double", "int64", "block", "uint7", "", "short"],
    "dimension": ["0", "2", "4", "-1", "99999999999", "x"],
    "encoding": ["gzip", "bzip2", "raw", "ascii", "hex", "zstd", ""],
    "space directions": ["(0,0,0) (0,1,0) (0,0,1)", "(nan,0,0) (0,1,0) (0,0,1)", "none (0,1,0) (0,0,1)",
                         "(1,0,0) (0,1,0)", "(inf,0,0) (0,1,0) (0,0,1)", "(1,0,0) (0,1,0) (0,0,-1)"],
    "space": ["right-anterior-superior", "scanner-xyz", "3", ""],
    "byte skip": ["-1", "100000", "3"],
    "endian": ["big", "middle"],
    "data file": ["/etc/hostname", "../../x.raw", "LIST"],
}


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout


def base_file(folder, suffix, rng) -> bytes:
    """A valid 16^3 skull-like mask in ``suffix``'s format, as bytes."""
    mask = np.zeros((16, 16, 16), np.uint8)
    mask[3:13, 3:13, 3:13] = 1
    mask[5:11, 5:11, 5:11] = 0
    path = save_mask(folder / f"base{suffix}", mask, np.diag([*rng.uniform(0.5, 2.0, 3), 1.0]), overwrite=True)
    data = path.read_bytes()
    path.unlink()
    return data


def mutate_nrrd(data: bytes, rng: random.Random) -> bytes:
    header, _, payload = data.partition(b"\n\n")
    lines = header.decode("latin-1").split("\n")
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(sorted(NRRD_VALUES))
        lines = [line for line in lines if not line.startswith(f"{key}:")] + [f"{key}: {rng.choice(NRRD_VALUES[key])}"]
    text = "\n".join(lines).encode("latin-1")
    if rng.random() < 0.3:  # flip bytes in the header text
        text = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            text[rng.randrange(len(text))] = rng.randrange(256)
        text = bytes(text)
    if rng.random() < 0.3:
        payload = payload[: rng.randrange(len(payload) + 1)]
    return text + b"\n\n" + payload


def mutate_nifti(data: bytes, rng: random.Random, gz: bool) -> bytes:
    raw = bytearray(zlib.decompress(data, 31) if gz else data)
    for _ in range(rng.randint(1, 6)):  # dim, datatype, pixdim, vox_offset, qform/sform live in the first 348 bytes
        offset = rng.choice([rng.randrange(348), rng.randrange(40, 56), rng.randrange(70, 112)])
        raw[offset] = rng.randrange(256)
    if rng.random() < 0.3:
        raw = raw[: rng.randrange(len(raw) + 1)]
    if not gz:
        return bytes(raw)
    packer = zlib.compressobj(wbits=31)
    return packer.compress(bytes(raw)) + packer.flush()


@pytest.mark.parametrize("suffix", FORMATS)
def test_mutated_files_end_in_a_mask_or_a_one_line_error(tmp_path, suffix):
    rng = random.Random(f"{SEED}{suffix}")
    inputs = tmp_path / "in"
    inputs.mkdir()
    base = base_file(tmp_path, suffix, np.random.default_rng(SEED))
    load = LoadSkulld(keys="image", max_input_voxels=MAX_VOXELS)
    outcomes, unexpected = {"mask": 0, "refused": 0}, []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for k in range(CASES_PER_FORMAT):
            path = inputs / f"case_{k}{suffix}"
            path.write_bytes(mutate_nrrd(base, rng) if suffix == ".nrrd" else mutate_nifti(base, rng, suffix == ".nii.gz"))
            signal.alarm(CASE_SECONDS)
            try:
                skull = load({"image": str(path)})["image"]
                assert skull.shape[0] == 1 and set(np.unique(np.asarray(skull)).tolist()) <= {0, 1}
                outcomes["mask"] += 1
            except CaseTimeout:
                unexpected.append(f"{path.name}: no answer within {CASE_SECONDS} s")
            except (ValueError, OSError) as err:
                message = str(err)
                if "\n" in message or path.name not in message:
                    unexpected.append(f"{path.name}: {type(err).__name__} not one line naming the file: {message!r}")
                outcomes["refused"] += 1
            except Exception as err:  # noqa: BLE001 - what the fuzzing is looking for
                unexpected.append(f"{path.name}: unexpected {type(err).__name__}: {err}")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert not unexpected, "\n".join(unexpected)
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["in", *(f"case_{k}{suffix}" for k in range(CASES_PER_FORMAT))])
    assert outcomes["refused"] > CASES_PER_FORMAT // 3 and outcomes["mask"] > 0  # both ends are reached
    print(f"{suffix}: {CASES_PER_FORMAT} mutated files, {outcomes}")


def test_random_dicom_uids_become_safe_names_inside_the_work_folder(tmp_path):
    rng = random.Random(SEED)
    pieces = ["..", "/", "\\", "\0", "\n", ".", "1", "2", "0", "~", "é", " ", "%2e", "C:", "-"]
    for _ in range(CASES_PER_FORMAT):
        uid = "".join(rng.choice(pieces) if rng.random() < 0.7 else chr(rng.randrange(1, 0x3000))
                      for _ in range(rng.randint(0, 80)))
        name = uid_name(uid)
        assert safe_name(name) == name and inside(tmp_path, tmp_path / f"{name}.nii.gz").parent == tmp_path
    assert not os.listdir(tmp_path)
