# diffusion_rl — every target sets itself up (the .venv stamp) on a fresh machine.
SHELL := /bin/bash
PY := .venv/bin/python
TORCH_VERSION := 2.13.0
# Where the CPU torch wheel comes from. Empty: pip's configured sources (this project's
# machines carry the CPU wheel locally). Elsewhere: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TABLE := $(PY) scripts/make_table.py

TABLES := qlearning_table3 qlearning_table3_beyond qlearning_table4 qlearning_table5 qlearning_table6 qlearning_fig1 qlearning_fig3 \
          elegant_table1 elegant_table2 elegant_table3 elegant_fig2 exact_gaussian exact_gaussian_mixture tutorial_table1 \
          digits_table digits_fig

.PHONY: help setup test demo all report readme dashboard bench clean elegant_lr_sweep elegant_table8 elegant_fig3 elegant_table9 $(TABLES)

help:  ## List the targets
	@grep -E '^[a-zA-Z0-9_ -]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 22

setup: .venv/.installed  ## Create .venv: pinned CPU torch first (no CUDA download), then `pip install -e .[dev]`

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	echo "torch==$$($(PY) -c 'import torch; print(torch.__version__)')" > .venv/constraints.txt
	$(PY) -m pip install -q -c .venv/constraints.txt -e '.[dev]'
	touch $@

test: setup  ## Run the test suite (closed forms, configs, every method end to end; ~13 min on 2 cores)
	$(PY) -m pytest tests --durations=20

demo: setup  ## Reduced-budget q-learning Table 3 on the CPU (< 10 min), printed at the end
	$(TABLE) qlearning_table3_demo

qlearning_table3: setup  ## q-learning paper Table 3: pretrained A, DDPO, DPOK vs q-learning at reward 0.7/0.8/0.9
	$(TABLE) $@
qlearning_table3_beyond: setup  ## Beyond Table 3: soft PPO, CTRL, RW-MLE, PCL, value-weighted, SVDD, SMC at reward 0.80 (model A, 1 seed)
	$(TABLE) $@
qlearning_table4: setup  ## Table 4: the same from the worse pretrained model B
	$(TABLE) $@
qlearning_table5: setup  ## Table 5: beta = 0, DDIM / ODE-Euler / SDE x 50 / 10 / 5 steps
	$(TABLE) $@
qlearning_table6: setup  ## Table 6: mean reward 0.80, DDIM / ODE-Euler / SDE x 50 / 10 / 5 steps
	$(TABLE) $@
qlearning_fig1: setup  ## Figure 1: 1-D densities for beta = 0, 0.1, 1 with the data density (PNG)
	$(TABLE) $@
qlearning_fig3: setup  ## Figure 3: Swiss-roll samples for a beta sweep (PNG)
	$(TABLE) $@

elegant_table1: setup  ## ELEGANT Table 1: TFBind8 Guidance / PPO+KL / ELEGANT (3 seeds) + exact optimum rows
	$(TABLE) $@
elegant_table2: setup  ## ELEGANT Table 2: GFP proxy, same methods, reduced CPU budget (GPU budget in the YAML)
	$(TABLE) $@
elegant_table3: setup  ## ELEGANT Table 3: TFBind8 r_hat vs genuine r, 6 methods x 3 seeds (shares Table 1's runs)
	$(TABLE) $@
elegant_fig2: setup  ## ELEGANT Figure 2: r_hat histograms of ELEGANT for alpha in {0.005 .. 0.1} + pretrained (PNG)
	$(TABLE) $@

exact_gaussian: setup  ## The exact-answer bench: every method on the 1-D Gaussian against its closed-form target
	$(TABLE) $@
exact_gaussian_mixture: setup  ## The exact-answer bench, harder case: a 2-D two-mode mixture whose tilt moves mass between modes
	$(TABLE) $@
tutorial_table1: setup  ## The RL tutorial's Table 1, measured on TFBind8: reward, KL, memory, wall time, reward queries / gradients
	$(TABLE) $@

all: $(TABLES)  ## Every CPU table and figure (finished runs are reused), then the README's results section
	$(PY) scripts/readme_results.py

digits_table: setup  ## Digits (images, CPU): every image method towards log p(3 | x), nominal vs genuine reward, KL, diversity (3 seeds)
	$(TABLE) $@
digits_fig: setup  ## Digits: one image grid per method (seed 0), from digits_table's runs (PNG)
	$(TABLE) $@
# Stable Diffusion 1.5 (GPUs, and local weights: nothing is downloaded). Give the folders and
# the trainer through ARGS, e.g.
#   make elegant_table8 ARGS="paths.sd_model=/w/sd15 paths.clip_model=/w/clip-l14 trainer=ddp trainer.devices=4"
# (or DIFFUSION_RL_SD_MODEL / DIFFUSION_RL_CLIP_MODEL); without them: one error line naming the key.
elegant_table8: setup  ## ELEGANT Table 8 on SD 1.5 + LAION aesthetics: NO KL, Guidance, PPO + KL, ELEGANT (GPU; paths.sd_model, paths.clip_model)
	$(TABLE) $@ $(ARGS)
elegant_fig3: setup  ## ELEGANT Figure 3: SD 1.5 training curves (in Table 8's report) and one image grid per method (GPU)
	$(TABLE) $@ $(ARGS)
elegant_table9: setup  ## ELEGANT Table 9: guidance with a Gaussian reward model on SD 1.5, target y x level gamma (GPU)
	$(TABLE) $@ $(ARGS)
elegant_lr_sweep: setup  ## The lr x batch sweep behind the TFBind8 fine-tuning budget (ELEGANT, alpha = 0.05)
	$(TABLE) $@

report: setup  ## Rebuild every report from the finished runs, without running anything, and outputs/report/index.html
	for t in $(TABLES); do $(TABLE) $$t --report-only > /dev/null && echo "outputs/report/$$t"; done
	$(PY) scripts/make_report.py

readme: report  ## Rewrite the README's results section from the reports (scripts/readme_results.py)
	$(PY) scripts/readme_results.py

dashboard: setup  ## TensorBoard over outputs/ on http://127.0.0.1:6006
	$(PY) -m tensorboard.main --logdir outputs --host 127.0.0.1 --port 6006

bench: setup  ## Benchmarks -> outputs/bench/*.json (q-learning Tables 3+4 and ELEGANT Table 3 wall time; chain memory; GFP diversity speed; the SD step: tiny on the CPU, SD 1.5 size on a GPU)
	$(PY) scripts/bench.py
	$(PY) scripts/bench_sd.py

clean:  ## Remove runs, caches and reports (keeps .venv)
	rm -rf outputs/runs outputs/cache outputs/cache_smoke outputs/report outputs/bench
