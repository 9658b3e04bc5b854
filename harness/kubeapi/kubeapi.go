// Package kubeapi runs a real kube-apiserver and etcd on 127.0.0.1 for
// tests and the agent demo. The binaries are built from the Go module
// proxy by tools/kube/build.sh (`make deps`) and cached outside the repo;
// nothing is downloaded here.
package kubeapi

import (
	"cmp"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/servicepath/servicepath/harness/procs"
)

// Versions built by tools/kube (a test keeps them in step with its go.mod).
const (
	KubernetesVersion = "v1.34.10"
	EtcdVersion       = "v3.6.4"
)

// AssetsEnv names a folder holding kube-apiserver and etcd, overriding the
// cache folder.
const AssetsEnv = "SERVICEPATH_KUBE_ASSETS"

// CacheDir is where tools/kube/build.sh caches what it builds.
func CacheDir() string {
	cache := os.Getenv("XDG_CACHE_HOME")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache")
	}
	return filepath.Join(cache, "servicepath", "kube")
}

// AssetsDir is where tools/kube/build.sh puts the binaries.
func AssetsDir() string {
	if d := os.Getenv(AssetsEnv); d != "" {
		return d
	}
	return filepath.Join(CacheDir(), "kube-apiserver-"+KubernetesVersion+"-etcd-"+EtcdVersion)
}

// ErrNoAssets says the binaries were never built.
var ErrNoAssets = errors.New("kube-apiserver and etcd not built")

// Assets returns the paths of the two binaries.
func Assets() (apiserver, etcd string, err error) {
	dir := AssetsDir()
	apiserver, etcd = filepath.Join(dir, "kube-apiserver"), filepath.Join(dir, "etcd")
	for _, p := range []string{apiserver, etcd} {
		if _, err := os.Stat(p); err != nil {
			return "", "", fmt.Errorf("%w: %s missing (run `make deps`, or set %s)", ErrNoAssets, p, AssetsEnv)
		}
	}
	return apiserver, etcd, nil
}

// Options configure a Server.
type Options struct {
	// Dir holds data, certificates and logs; it must exist.
	Dir string
	// Netns, when set, runs both processes in that named network namespace
	// (`ip netns exec`), so that a process there reaches 127.0.0.1.
	Netns string
	// ServiceCIDRs is --service-cluster-ip-range; cluster IPs given in
	// Services must be inside. Default: 10.96.0.0/16,fd00:10:96::/112.
	ServiceCIDRs string
	// Dial, when set, makes the connections to the API server, e.g. from
	// inside Netns.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Address, when set, is where kube-apiserver listens and what it
	// advertises (the kubernetes Service's endpoint), so that other hosts
	// reach it; default 127.0.0.1, advertising an address nobody answers on.
	Address string
	// ExtraArgs are appended to kube-apiserver's flags (a later flag wins).
	ExtraArgs []string
}

// Server is a running etcd and kube-apiserver.
type Server struct {
	opts          Options
	apiserverPath string
	etcdPath      string
	etcdURL       string
	port          int
	token         string
	etcd          *procs.Proc
	apiserver     *procs.Proc
	// Kubeconfig is a file a client (or `servicepath agent`) can use.
	Kubeconfig string
	// Config is the admin's client configuration.
	Config *rest.Config
}

const startTimeout = 60 * time.Second

// Start starts etcd, then kube-apiserver, and waits for /readyz.
func Start(opts Options) (*Server, error) {
	apiserver, etcd, err := Assets()
	if err != nil {
		return nil, err
	}
	s := &Server{opts: opts, apiserverPath: apiserver, etcdPath: etcd, token: randomHex(16)}
	if err := s.writeFiles(); err != nil {
		return nil, err
	}
	ports, err := s.freePorts(3)
	if err != nil {
		return nil, err
	}
	s.port = ports[2]
	s.etcdURL = fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peer := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	s.etcd, err = s.spawn("etcd", etcd,
		"--name=default",
		"--data-dir="+filepath.Join(opts.Dir, "etcd"),
		"--listen-client-urls="+s.etcdURL, "--advertise-client-urls="+s.etcdURL,
		"--listen-peer-urls="+peer, "--initial-advertise-peer-urls="+peer,
		"--initial-cluster=default="+peer,
		"--unsafe-no-fsync", "--log-level=warn")
	if err != nil {
		return nil, err
	}
	if err := s.StartAPIServer(); err != nil {
		s.Stop()
		return nil, fmt.Errorf("%w\netcd log:\n%s", err, s.LogTail("etcd"))
	}
	return s, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func (s *Server) path(name string) string { return filepath.Join(s.opts.Dir, name) }

// writeFiles writes the service-account key pair and the token file.
func (s *Server) writeFiles() error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"sa.key": pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}),
		"sa.pub": pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}),
		// Anonymous access is off: the admin authenticates with this token.
		"tokens.csv": []byte(s.token + `,admin,admin-uid,"system:masters"` + "\n"),
	}
	for name, data := range files {
		if err := os.WriteFile(s.path(name), data, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// freePorts asks for ports in the namespace the servers will run in.
func (s *Server) freePorts(n int) ([]int, error) {
	if s.opts.Netns == "" {
		var ports []int
		var ls []net.Listener
		defer func() {
			for _, l := range ls {
				l.Close()
			}
		}()
		for range n {
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				return nil, err
			}
			ls = append(ls, l)
			ports = append(ports, l.Addr().(*net.TCPAddr).Port)
		}
		return ports, nil
	}
	// A fresh netns has every port free.
	return []int{2379, 2380, 6443}[:n], nil
}

// spawn starts a binary, in the netns if one is set, logging to a file.
func (s *Server) spawn(name, bin string, args ...string) (*procs.Proc, error) {
	if s.opts.Netns != "" {
		args = append([]string{"netns", "exec", s.opts.Netns, bin}, args...)
		bin = "ip"
	}
	return procs.Start(name, s.path(name+".log"), exec.Command(bin, args...))
}

// StartAPIServer starts kube-apiserver (again, on the same port, after
// StopAPIServer) and waits until it is ready.
func (s *Server) StartAPIServer() error {
	// Not loopback, or the built-in kubernetes Service's endpoints are
	// refused; a documentation address nobody answers on.
	bind, advertise := "127.0.0.1", "192.0.2.1"
	if s.opts.Address != "" {
		bind, advertise = s.opts.Address, s.opts.Address
	}
	args := []string{
		"--etcd-servers=" + s.etcdURL,
		"--bind-address=" + bind, "--secure-port=" + strconv.Itoa(s.port),
		"--advertise-address=" + advertise,
		"--cert-dir=" + s.path("certs"),
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + s.path("sa.pub"),
		"--service-account-signing-key-file=" + s.path("sa.key"),
		"--token-auth-file=" + s.path("tokens.csv"),
		// RBAC, so deploy/'s ClusterRole is really what the agent gets.
		"--authorization-mode=RBAC",
		"--service-cluster-ip-range=" + cmp.Or(s.opts.ServiceCIDRs, "10.96.0.0/16,fd00:10:96::/112"),
		"--enable-priority-and-fairness=false",
	}
	var err error
	s.apiserver, err = s.spawn("kube-apiserver", s.apiserverPath, append(args, s.opts.ExtraArgs...)...)
	if err != nil {
		return err
	}
	s.Config = &rest.Config{
		Host:            "https://" + net.JoinHostPort(bind, strconv.Itoa(s.port)),
		BearerToken:     s.token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
		QPS:             -1, // tests create objects in bursts
		Dial:            s.opts.Dial,
	}
	s.Kubeconfig = s.path("kubeconfig")
	if err := os.WriteFile(s.Kubeconfig, []byte(fmt.Sprintf(kubeconfigTemplate, s.Config.Host, s.token)), 0o600); err != nil {
		return err
	}
	return s.waitReady()
}

const kubeconfigTemplate = `apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: %s
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: %s
contexts:
- name: local
  context: {cluster: local, user: admin}
current-context: local
`

func (s *Server) waitReady() error {
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	go func() {
		select {
		case <-s.apiserver.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := readyz(ctx, s.Config); err != nil {
		if exited, how := s.apiserver.Exited(); exited {
			return fmt.Errorf("kube-apiserver exited (%s):\n%s", how, s.LogTail("kube-apiserver"))
		}
		return fmt.Errorf("%w:\n%s", err, s.LogTail("kube-apiserver"))
	}
	return nil
}

// LogTail returns the end of a server's log, for failure messages.
func (s *Server) LogTail(name string) string { return procs.Tail(s.path(name+".log"), 4000) }

// Client returns an admin clientset.
func (s *Server) Client() (*kubernetes.Clientset, error) {
	return kubernetes.NewForConfig(s.Config)
}

// StopAPIServer stops kube-apiserver and leaves etcd running.
func (s *Server) StopAPIServer() error { return s.apiserver.Stop(stopGrace) }

// Stop stops kube-apiserver, then etcd.
func (s *Server) Stop() error {
	return errors.Join(s.apiserver.Stop(stopGrace), s.etcd.Stop(stopGrace))
}

const stopGrace = 10 * time.Second

// readyz waits until ctx ends for the API server to answer /readyz.
func readyz(ctx context.Context, cfg *rest.Config) error {
	c, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	for {
		_, err := c.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("API server at %s not ready: %w", cfg.Host, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}
