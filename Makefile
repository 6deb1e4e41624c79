# Shortcuts for dev.py, which needs nothing but python3 (use it directly where make is missing).
.PHONY: run test bench demo
run:
	python3 dev.py run
test:
	python3 dev.py test
bench:
	python3 dev.py bench
demo:
	python3 dev.py demo
