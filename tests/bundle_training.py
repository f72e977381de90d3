"""Shared helper of the trainer tests: run a training config in-process and record its losses."""

from ignite.engine import Events
from monai.bundle import ConfigWorkflow


def train_in_process(config: str, dataset_dir, output_dir, **overrides):
    """Run ``config`` (a train workflow) with overrides; returns (workflow, per-iteration training losses).

    MONAI's train properties are checked on the way. ``train_inferer`` does not apply (the iteration
    functions compute the diffusion / SAP losses, not a forward pass of an inferer) and is given here
    only so that the check of all the others can run."""
    workflow = ConfigWorkflow(
        config_file=config, workflow_type="train", dataset_dir=str(dataset_dir), output_dir=str(output_dir),
        **{"train#inferer": {"_target_": "SimpleInferer"}}, **overrides,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    losses = []
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output["loss"].item()))
    workflow.run()
    workflow.finalize()
    return workflow, losses
