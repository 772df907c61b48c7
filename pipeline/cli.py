"""`dualpm-prep`: the preprocessing command group.

Subcommands live in their stage modules and are imported only when used, so `dualpm-prep --help`
stays fast and a stage's heavy dependencies (Ray, diffusers, ...) load only for that stage.
"""

from __future__ import annotations

import importlib

import click

# command name -> "module:attribute"
COMMANDS = {
    "synth": "pipeline.synth.command:synth",
    "render": "pipeline.render_stage:render",
    "features": "pipeline.features_stage:features",
    "verify": "pipeline.store_commands:verify",
    "show": "pipeline.store_commands:show",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="dualpm")
def main() -> None:
    """DualPM preprocessing: synthetic data, dual point map rendering and feature extraction into
    sharded, resumable WebDataset / Zarr stores, on local Ray or a Ray cluster (--address)."""


if __name__ == "__main__":
    main()
