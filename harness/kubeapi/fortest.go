package kubeapi

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"testing"
)

var shared struct {
	once sync.Once
	srv  *Server
	dir  string
	err  error
}

// Shared starts one server for the whole test binary (about 3 s each) and
// returns it; t skips, saying why, when the binaries were never built. Tests
// share it, so each uses namespaces of its own. A TestMain calls RunTests.
func Shared(t testing.TB) *Server {
	t.Helper()
	shared.once.Do(func() {
		if _, _, err := Assets(); err != nil {
			shared.err = err
			return
		}
		shared.dir, shared.err = os.MkdirTemp("", "servicepath-kubeapi-")
		if shared.err == nil {
			shared.srv, shared.err = Start(Options{Dir: shared.dir})
		}
	})
	if errors.Is(shared.err, ErrNoAssets) {
		t.Skipf("needs a real API server: %v", shared.err)
	}
	if shared.err != nil {
		t.Fatalf("start kube-apiserver and etcd: %v", shared.err)
	}
	return shared.srv
}

// RunTests is a TestMain for a package whose tests use Shared: it runs
// them, then stops the server.
func RunTests(m *testing.M) {
	code := m.Run()
	if err := StopShared(); err != nil {
		fmt.Fprintf(os.Stderr, "stop kube-apiserver and etcd: %v\n", err)
		code = 1
	}
	os.Exit(code)
}

// StopShared stops the server Shared started, if any, and removes its files.
func StopShared() error {
	var err error
	if shared.srv != nil {
		err = shared.srv.Stop()
	}
	if shared.dir != "" {
		err = errors.Join(err, os.RemoveAll(shared.dir))
	}
	return err
}
