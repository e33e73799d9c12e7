"""Allow `python -m llmhost`."""

from llmhost.cli.main import run

run()
