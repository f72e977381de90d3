"""Shared helpers of the trainer tests: run a training config in-process, hooking its trainer before it trains."""

from ignite.engine import Events
from monai.bundle import ConfigWorkflow


def run_with_trainer_hook(workflow: ConfigWorkflow, hook) -> None:
    """Run the workflow's ``run`` steps in order, as ``workflow.run()`` does, and call ``hook(train#trainer)``
    before the last one (``trainer.run()``): the steps before it seed and attach the bundle's own handlers
    (checkpoint resume first), so the test's handlers come after them, as for a user's. Then finalize."""
    last = len(workflow.parser["run"]) - 1
    for step in range(last):
        workflow.parser.get_parsed_content(f"run#{step}")
    hook(workflow.parser.get_parsed_content("train#trainer"))
    workflow.parser.get_parsed_content(f"run#{last}")
    workflow.finalize()


def train_in_process(config: list[str], dataset_dir, output_dir, **overrides):
    """Run ``config`` (the train base and a trainer layer, a train workflow) with overrides; returns
    (workflow, per-iteration training losses). MONAI's train properties are checked on the way."""
    workflow = ConfigWorkflow(
        config_file=config, workflow_type="train", dataset_dir=str(dataset_dir), output_dir=str(output_dir),
        **overrides,
    )
    workflow.initialize()
    losses = []

    def hook(trainer):
        assert workflow.check_properties() == []  # builds every property: after the seeding step
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output["loss"].item()))

    run_with_trainer_hook(workflow, hook)
    return workflow, losses
