# Two commands on a fresh machine: `make demo` and `make test`. Each builds the
# pinned .venv it needs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck unit demo bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/shellcheck user_data/*.sh

typecheck: $(STAMP)
	$(BIN)/mypy

# The whole suite: lint, types, every test, and the offline deploy checks.
test: lint typecheck
	$(BIN)/pytest -q --ignore=tests/deploy
	$(MAKE) deploy-check

demo: $(STAMP)
	$(BIN)/python -m spotctl.demo

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# -- deploy artifacts, checked offline (issue 7) -------------------------------------
# `chalice package` for each stage with infra/resources.yaml merged in, the SAM
# template expanded to plain CloudFormation, cfn-lint on both, checkov on the
# expansion, then the template/policy/bootstrap/observability tests. Fake
# credentials and an unroutable AWS endpoint: nothing here can reach AWS. The first
# run downloads the Lambda's wheels from PyPI (chalice caches them in
# .chalice/deployments/); see docs/deploy.md for a wheelhouse-only variant.
IAC_VENV := .venv-iac
IAC_STAMP := $(IAC_VENV)/.installed
DEPLOY_OUT := build/deploy
OFFLINE_AWS := env AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=offline \
	AWS_SECRET_ACCESS_KEY=offline AWS_ENDPOINT_URL=http://127.0.0.1:9 \
	AWS_EC2_METADATA_DISABLED=true

$(IAC_STAMP): infra/requirements-iac.txt
	test -x $(IAC_VENV)/bin/python || $(PYTHON) -m venv $(IAC_VENV)
	$(IAC_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r infra/requirements-iac.txt
	touch $(IAC_STAMP)

.PHONY: deploy-check
deploy-check: $(STAMP) $(IAC_STAMP)
	rm -rf $(DEPLOY_OUT)
	for stage in dev prod; do \
	  $(OFFLINE_AWS) $(BIN)/chalice package --stage $$stage --template-format yaml \
	    --merge-template infra/resources.yaml $(DEPLOY_OUT)/$$stage || exit 1; \
	  $(OFFLINE_AWS) $(IAC_VENV)/bin/python infra/sam_to_cfn.py \
	    $(DEPLOY_OUT)/$$stage/sam.yaml $(DEPLOY_OUT)/$$stage/cfn.json || exit 1; \
	  $(IAC_VENV)/bin/cfn-lint $(DEPLOY_OUT)/$$stage/sam.yaml $(DEPLOY_OUT)/$$stage/cfn.json || exit 1; \
	  $(IAC_VENV)/bin/checkov --config-file infra/checkov.yaml -f $(DEPLOY_OUT)/$$stage/cfn.json || exit 1; \
	done
	SPOTCTL_DEPLOY_OUT=$(DEPLOY_OUT) $(BIN)/pytest -q tests/deploy
