# ClaudeFS. `make test` installs what the tests need and runs them all; `make test-<crate>`
# runs one top-level crate's tests; `make check` adds fmt, clippy and doc.
CARGO ?= cargo
CRATES := hugepages nvme dataplane fabric metadata proto fuse-client objtier sim

.PHONY: all build release deps test check fmt clippy doc bench clean test-cluster test-vfio $(addprefix test-,$(CRATES))

all: build

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --workspace --release

deps:
	./scripts/deps test

# CFS_REQUIRE_OFI / CFS_REQUIRE_S3: the RMA and object-tier tests fail instead of skipping
# when libfabric or the S3 servers are missing (deps installs them).
test: deps
	PATH=$$HOME/.cargo/bin:$$PATH CFS_REQUIRE_OFI=1 CFS_REQUIRE_S3=1 $(CARGO) test --workspace
	PATH=$$HOME/.cargo/bin:$$PATH ./scripts/test-rma.sh
	PATH=$$HOME/.cargo/bin:$$PATH ./scripts/test-tier.sh
	./scripts/test-hugepages.sh
	./scripts/test-vfio.sh
	PATH=$$HOME/.cargo/bin:$$PATH ./scripts/test-posix.sh
	./scripts/test-cluster.sh
	NODES=5 READ_MODE=lease META_SHARDS=3 ./scripts/test-cluster.sh
	./scripts/test-partition.sh
	NODES=5 ./scripts/test-partition.sh
	./scripts/test-rebuild.sh
	META_SHARDS=3 ./scripts/test-rebuild.sh

test-hugepages: deps
	$(CARGO) test -p cfs-hugepages
	./scripts/test-hugepages.sh

test-nvme: deps
	$(CARGO) test -p cfs-nvme
	./scripts/test-vfio.sh

# Our userspace NVMe driver on an emulated controller behind VFIO, in a QEMU guest.
test-vfio: deps
	./scripts/test-vfio.sh

test-dataplane: deps
	$(CARGO) test -p cfs-dataplane

# One-sided RMA reads over libfabric's tcp;ofi_rxm and sockets providers on loopback, then
# a FUSE mount reading over them (fsx, mixed clients, fallbacks, lying layouts).
test-fabric: deps
	CFS_REQUIRE_OFI=1 $(CARGO) test -p cfs-fabric
	PATH=$$HOME/.cargo/bin:$$PATH ./scripts/test-rma.sh

test-metadata: deps
	$(CARGO) test -p cfs-meta -p cfs-meta-replica

# Deterministic simulation (CFS_SIM_SEEDS=K for more seeds, CFS_SIM_SEED=N to replay one).
test-sim: deps
	$(CARGO) test -p cfs-sim

# Three-process clusters: SIGKILL of the leader under load (loopback), and a partition of the
# leader (network namespaces).
test-cluster: deps
	./scripts/test-cluster.sh
	NODES=5 READ_MODE=lease META_SHARDS=3 ./scripts/test-cluster.sh
	./scripts/test-partition.sh
	NODES=5 ./scripts/test-partition.sh
	./scripts/test-rebuild.sh
	META_SHARDS=3 ./scripts/test-rebuild.sh

test-proto: deps
	$(CARGO) test -p cfs-proto

# Blobs on two real S3 servers (s3s-fs and moto) on loopback, through a recording proxy; then
# the tier through a FUSE mount (flush, evict, read back, compaction, outages, a flaky store).
test-objtier: deps
	PATH=$$HOME/.cargo/bin:$$PATH CFS_REQUIRE_S3=1 $(CARGO) test -p cfs-objtier
	PATH=$$HOME/.cargo/bin:$$PATH ./scripts/test-tier.sh

test-fuse-client: deps
	$(CARGO) test -p cfs-fuse-client
	PATH=$$HOME/.cargo/bin:$$PATH ./scripts/test-posix.sh

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

check: fmt clippy doc test

# Benchmark (not a test): the chunk store vs fio on the same file. See docs/benchmarks.md.
bench:
	./scripts/deps bench
	$(CARGO) build --release -p cfs-dataplane
	./target/release/cfs-dataplane bench --dir $${BENCH_DIR:-/var/tmp/cfs-bench}

clean:
	$(CARGO) clean
