"""Shared helper of the trainer tests: run a training config in-process and record its losses."""

from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.utils import set_determinism


def train_in_process(config: list[str], dataset_dir, output_dir, **overrides):
    """Run ``config`` (the train base and a trainer layer, a train workflow) with overrides; returns
    (workflow, per-iteration training losses). MONAI's train properties are checked on the way."""
    workflow = ConfigWorkflow(
        config_file=config, workflow_type="train", dataset_dir=str(dataset_dir), output_dir=str(output_dir),
        **overrides,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    set_determinism(seed=workflow.parser.get_parsed_content("seed"))  # the network is made here, before `run` seeds
    losses = []
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output["loss"].item()))
    workflow.run()
    workflow.finalize()
    return workflow, losses
