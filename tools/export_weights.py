"""Turn a training checkpoint into a weights file for ``models/`` that carries its training recipe.

    python -m tools.export_weights runs/denoiser_small/checkpoints/final.pt models/model.pt --key ema_network \
        --config "['configs/train_base.json','configs/train_diffusion.json','configs/recipes/denoiser_small.json']" --overwrite true
    python -m tools.large_files     # then refresh the checksums in large_files.yml

The recipe is the ``recipe`` entry of the training config(s) the checkpoint was trained with (the same
files, in the same order, as the training command's ``--config_file``), plus the bundle version of
``configs/metadata.json``; the inference config checks it when it loads the file.
"""

from __future__ import annotations

from scripts.weights import export_weights

if __name__ == "__main__":
    import fire

    fire.Fire(export_weights)
