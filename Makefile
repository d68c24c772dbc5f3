# The two commands of the README. Both set up .venv first (idempotent, seconds when done).
.PHONY: setup test demo bench

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

demo: setup
	bash scripts/demo.sh

bench: setup
	bash scripts/bench.sh
