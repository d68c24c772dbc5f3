# The two commands of the README. Both set up .venv first (idempotent, seconds when done).
.PHONY: setup test test-quick test-random demo bench

setup:
	bash scripts/setup.sh

test: setup
	.venv/bin/python -m pytest -q

# The inner loop: unit and component tests, no end-to-end run (tests marked slow); <= 5 min on an idle box.
test-quick: setup
	.venv/bin/python -m pytest -q -m "not slow"

# The quick tier in a random order (modules, and tests within each), to catch tests that pass only
# after another one. The header prints the seed (hence no -q); `make test-random SEED=N` replays it.
test-random: setup
	.venv/bin/python -m pytest -m "not slow" $(if $(SEED),--random-order-seed=$(SEED),--random-order)

demo: setup
	bash scripts/demo.sh

bench: setup
	bash scripts/bench.sh
