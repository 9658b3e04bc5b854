# servicepath: the eBPF kube-proxy replacement and its test harness.
# Most targets need root (BPF, netns); `make deps` installs what they use.

GO        ?= go
BIN       := bin
# Debian packages the repo needs: clang/llvm/libbpf-dev to regenerate the
# BPF objects, iproute2 for `ip netns exec`, dnsmasq and dig for the
# resolver round trip through socket-level load balancing, iptables and
# nftables for the kube-proxy baselines and the agent's image; busybox-static, curl and
# netcat-openbsd (with bind9-dnsutils and iproute2) for the e2e images.
APT_PKGS  := clang llvm libbpf-dev linux-libc-dev iproute2 dnsmasq-base bind9-dnsutils iptables nftables \
	busybox-static curl wget netcat-openbsd
# containerd, runc and the CNI plugins for harness/kubecluster's nodes.
CLUSTER_APT_PKGS := containerd runc containernetworking-plugins
BENCH     ?= quick

.PHONY: all deps cluster-deps kubecluster cluster cluster-down conformance generate generate-check build image test demo demo-agent bench bench-fixtures scenarios vmtest lint clean

all: build

# apt-install PACKAGES: installs those missing; apt runs only when one is.
apt-install = missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed$$' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Idempotent.
deps:
	@$(call apt-install,$(APT_PKGS) $(CLUSTER_APT_PKGS))
	$(GO) mod download
	$(GO) run ./vmtests/cmd/vmtest deps
	# kube-apiserver + etcd for the agent's tests, from the Go module proxy (cached)
	PATH="$$(dirname $$(command -v $(GO))):$$PATH" tools/kube/build.sh
	# Debian's nginx unpacked (not installed: no server starts) for the e2e nginx image
	tools/image/debs.sh nginx nginx-common

# What the one-machine cluster adds (harness/kubecluster; containerd, runc and
# the CNI plugins come with make deps): kubelet, the controllers, kube-proxy,
# kubectl, agnhost, CoreDNS, e2e.test and ginkgo from the Go module proxy
# (cached; about 15 minutes cold). Idempotent.
cluster-deps: deps
	PATH="$$(dirname $$(command -v $(GO))):$$PATH" tools/kube/build.sh cluster

kubecluster:
	$(GO) build -o $(BIN)/kubecluster ./harness/kubecluster/cmd/kubecluster

# A two-node cluster with servicepath's DaemonSet in place of kube-proxy,
# left running: `bin/kubecluster kubectl -- get pods -A`. CLUSTER_FLAGS
# override (e.g. "-proxy iptables" for kube-proxy instead).
cluster: cluster-deps image kubecluster
	$(BIN)/kubecluster up $(or $(CLUSTER_FLAGS),-servicepath)

cluster-down: kubecluster
	$(BIN)/kubecluster down

# The upstream e2e network tests against kube-proxy (iptables, nftables) and
# servicepath (socket-LB, and pods per packet), one cluster after another:
# results/conformance/. CONFORMANCE_FLAGS narrow it (-modes, -focus).
conformance: cluster-deps image kubecluster
	$(BIN)/kubecluster conformance $(CONFORMANCE_FLAGS)

# Rebuilds the committed bpf2go output from bpf/*.c with Debian's clang.
generate:
	$(GO) generate ./datapath/...

# Fails when the committed generated files are not what `make generate` makes.
generate-check: generate
	@git diff --exit-code --stat -- '*_bpfel.go' '*_bpfel.o' || \
		{ echo "generated BPF files are stale: run make generate and commit"; exit 1; }
	@untracked=$$(git ls-files --others --exclude-standard -- '*_bpfel.go' '*_bpfel.o'); \
		[ -z "$$untracked" ] || { echo "untracked generated files: $$untracked"; exit 1; }

# -buildvcs=auto: `servicepath version` names the commit where git can say it.
build:
	$(GO) build -buildvcs=auto -o $(BIN)/servicepath ./cmd/servicepath
	$(GO) build -o $(BIN)/servicepath-demo ./cmd/servicepath-demo
	$(GO) build -o $(BIN)/servicepath-agent-demo ./cmd/servicepath-agent-demo

# The agent's image, $(BIN)/servicepath-image.tar (docker-archive, for
# `ctr -n k8s.io images import`), reproducible: a static binary whose version
# is stamped from git by the Go toolchain (`go version -m`; not in a git
# worktree, which Go does not recognise), and Debian's iptables.
image:
	CGO_ENABLED=0 $(GO) build -trimpath -buildvcs=true -ldflags "-s -w" -o $(BIN)/image/servicepath ./cmd/servicepath
	$(GO) run ./tools/image/cmd/mkimage -out $(BIN) -servicepath $(BIN)/image/servicepath

# As root every test runs; as another user the privileged ones skip, saying why.
test:
	$(GO) test -count=1 ./...

demo: build
	$(BIN)/servicepath-demo --servicepath $(BIN)/servicepath --manifest deploy/examples/demo.yaml

# make demo with a local kube-apiserver + etcd and `servicepath agent` instead of `apply`.
demo-agent: build
	$(BIN)/servicepath-agent-demo --servicepath $(BIN)/servicepath --manifest deploy/examples/demo.yaml

# servicepath against kube-proxy (iptables, nftables) and no rules at all;
# BENCH=quick|full|smoke. Writes results/bench/<kernel>-<date>/ and
# results/README.md (smoke: a temporary directory).
bench:
	$(GO) build -o $(BIN)/bench ./bench/cmd/bench
	$(BIN)/bench -profile $(BENCH)

# ns/packet of every ClusterIP fixture row through BPF_PROG_TEST_RUN.
bench-fixtures:
	$(GO) test -run '^$$' -bench . -benchtime 20000x -count 5 ./bench/...

# Scenarios (collision, LRU scale, zones, socket state, churn, agent scale), full forms:
# results/scenarios/<name>/ with verdicts. Small forms run in make test. Agent scale
# alone takes up to its 10-minute load budget plus about 3 minutes.
scenarios:
	$(GO) test -p 1 -count=1 -timeout 60m ./scenarios/... -args -scenario.full

# The suite in VMs across kernels; KERNELS="6.12 7.2" selects series, PKGS packages.
vmtest:
	$(GO) run ./vmtests/cmd/vmtest $(if $(KERNELS),-kernels "$(KERNELS)") $(PKGS)

lint:
	@out=$$(git ls-files '*.go' | grep -v '_bpfel\.go$$' | xargs gofmt -l); \
		[ -z "$$out" ] || { echo "gofmt needed:"; echo "$$out"; exit 1; }
	$(GO) vet ./...
	@for f in bpf/*.c; do clang -target bpfel -O2 -Wall -Werror -Ibpf/include -fsyntax-only $$f || exit 1; done

clean:
	rm -rf $(BIN)
