from autopsy.cli import run

run()
