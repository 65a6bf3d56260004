# prefixkv: the two entry points of the README.
#   make run   installs what is missing, builds, and describes the bundled example image
#   make test  installs what is missing, builds, and runs the whole test suite
BUILD ?= build
JOBS ?= $(shell nproc)
MODEL ?= models/prefixkv-llava-tiny
IMAGE ?= data/example.png

.PHONY: all deps build run test clean

all: build

deps:
	@bash scripts/setup.sh

build: deps
	@cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

run: build
	./$(BUILD)/prefixkv run --model $(MODEL) --image $(IMAGE) --prompt "Describe the image in detail." --max-tokens 300

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD)
