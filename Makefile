# prefixkv: the two entry points of the README.
#   make run   installs what the CLI needs (scripts/setup.sh run), builds only the prefixkv program,
#              and describes the bundled example image
#   make test  installs what the tests need (scripts/setup.sh test), builds everything (the tests
#              included), and runs the whole test suite
# Both use the same build folder. `make run` configures a fresh folder without the tests (so it needs
# no GoogleTest); `make test` turns them on (-DPREFIXKV_TESTS=ON), and a later `make run` leaves
# that setting alone and still builds only the prefixkv target.
BUILD ?= build
JOBS ?= $(shell nproc)
MODEL ?= models/prefixkv-llava-tiny
IMAGE ?= data/example.png
CMAKE_CONFIGURE = cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release

.PHONY: all deps deps-run build build-run run test clean

all: build

# What `make test` needs (scripts/setup.sh test: the CLI's libraries, GoogleTest, node and npm).
deps:
	@bash scripts/setup.sh test

# What `make run` needs (scripts/setup.sh run: no GoogleTest, no node).
deps-run:
	@bash scripts/setup.sh run

# Everything, the tests included.
build: deps
	@$(CMAKE_CONFIGURE) -DPREFIXKV_TESTS=ON >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

# Only the prefixkv program. A folder that has no CMakeCache.txt yet is configured without the tests.
build-run: deps-run
	@$(CMAKE_CONFIGURE) $$([ -f $(BUILD)/CMakeCache.txt ] || echo -DPREFIXKV_TESTS=OFF) >/dev/null
	@cmake --build $(BUILD) -j $(JOBS) --target prefixkv

run: build-run
	$(if $(filter /%,$(BUILD)),,./)$(BUILD)/prefixkv run --model $(MODEL) --image $(IMAGE) --prompt "Describe the image in detail." --max-tokens 300

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD)
