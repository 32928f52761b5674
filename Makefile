# Convenience wrappers; scripts/run.sh does the work (and needs no make on a fresh machine).
.PHONY: setup demo test lint
setup: ; bash ./scripts/run.sh setup
demo: ; bash ./scripts/run.sh demo
test: ; bash ./scripts/run.sh test
lint: ; .venv/bin/ruff check orchestrator tests bench && .venv/bin/mypy orchestrator
