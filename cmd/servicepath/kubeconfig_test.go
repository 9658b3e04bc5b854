package main

import (
	"context"
	"crypto/tls"
	"encoding/pem"
	"net/url"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/servicepath/servicepath/harness/kubeapi"
)

func TestAPIServerURL(t *testing.T) {
	for in, want := range map[string]string{
		"10.0.0.1:6443":                 "https://10.0.0.1:6443",
		"cp.example:443":                "https://cp.example:443",
		"[fd00::1]:6443":                "https://[fd00::1]:6443",
		"https://cp.example:6443":       "https://cp.example:6443",
		"https://cp.example":            "https://cp.example",
		"https://cp.example/":           "https://cp.example",
		"https://[fd00::1]:6443":        "https://[fd00::1]:6443",
		"https://10.0.0.1:6443/":        "https://10.0.0.1:6443",
		"https://control-plane.lan:443": "https://control-plane.lan:443",
	} {
		got, err := apiServerURL(in)
		if assert.NoError(t, err, "%q is valid", in) {
			assert.Equal(t, want, got, "URL of %q", in)
		}
	}
	for in, msg := range map[string]string{
		"10.0.0.1":              "missing port",
		"fd00::1:6443":          "too many colons",
		":6443":                 "no host",
		"10.0.0.1:0":            `port "0" is not a number from 1 to 65535`,
		"10.0.0.1:https":        `port "https"`,
		"http://10.0.0.1:6443":  `scheme "http": the service account token is sent over https only`,
		"10.0.0.1:6443/api":     `port "6443/api"`,
		"https://cp:99999":      `port "99999"`,
		"https://cp:":           `port ""`,
		"https://cp/api":        "without user, path or query",
		"https://admin@cp:6443": "without user, path or query",
		"https://cp:6443?x=1":   "without user, path or query",
		"https:///":             "no host",
		"https://cp:6443 extra": "invalid",
		"ftp://cp.example:21":   `scheme "ftp"`,
	} {
		_, err := apiServerURL(in)
		if assert.Error(t, err, "%q is refused", in) {
			assert.Contains(t, err.Error(), msg, "the error about %q says what is wrong", in)
			assert.Contains(t, err.Error(), in, "the error names the value %q", in)
		}
	}
}

func TestAPIServerFlagErrors(t *testing.T) {
	code, _, errOut := runCLI("agent", "--k8s-api-server", "http://10.0.0.1:6443")
	assert.Equal(t, 1, code, "an http API server fails")
	assert.Contains(t, errOut, "--k8s-api-server (or $SERVICEPATH_K8S_API_SERVER)", "the message names the flag and variable")
	assert.Contains(t, errOut, "https only", "the message says what is wrong")

	t.Setenv(envAPIServer, "10.0.0.1")
	code, _, errOut = runCLI("agent")
	assert.Equal(t, 1, code, "a bad $%s fails", envAPIServer)
	assert.Contains(t, errOut, `"10.0.0.1": want host:port`, "the message says what is wrong with the variable")

	// The flag wins over the variable; the pod's credentials are missing.
	old := serviceAccountDir
	serviceAccountDir = t.TempDir()
	t.Cleanup(func() { serviceAccountDir = old })
	code, _, errOut = runCLI("agent", "--k8s-api-server", "10.0.0.1:6443")
	assert.Equal(t, 1, code, "no service account token fails")
	assert.Contains(t, errOut, "in-cluster credentials for https://10.0.0.1:6443", "the flag, not the variable")
	assert.Contains(t, errOut, filepath.Join(serviceAccountDir, "token"), "the message names the missing file")
}

// TestAPIServerInCluster authenticates as a pod does, with a token and
// the cluster's CA in the service account folder, at the address the flag
// gives: the server's certificate is verified, not skipped.
func TestAPIServerInCluster(t *testing.T) {
	srv := kubeapi.Shared(t)
	u, err := url.Parse(srv.Config.Host)
	require.NoError(t, err, "API server URL")

	dir := t.TempDir()
	conn, err := tls.Dial("tcp", u.Host, &tls.Config{InsecureSkipVerify: true})
	require.NoError(t, err, "TLS to the API server")
	chain := conn.ConnectionState().PeerCertificates
	conn.Close()
	ca := chain[len(chain)-1]
	require.NoError(t, os.WriteFile(filepath.Join(dir, "ca.crt"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Raw}), 0o600), "ca.crt")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "token"), []byte(srv.Config.BearerToken), 0o600), "token")
	old := serviceAccountDir
	serviceAccountDir = dir
	t.Cleanup(func() { serviceAccountDir = old })

	for _, value := range []string{u.Host, srv.Config.Host} {
		cfg, err := kubeClientConfig("", value)
		require.NoError(t, err, "config for %q", value)
		assert.Equal(t, srv.Config.Host, cfg.Host, "the flag's server")
		assert.False(t, cfg.Insecure, "the CA is used")
		client, err := kubernetes.NewForConfig(cfg)
		require.NoError(t, err, "client")
		_, err = client.CoreV1().Services("default").Get(context.Background(), "kubernetes", metav1.GetOptions{})
		assert.NoError(t, err, "the pod's credentials reach the API server at %q", value)
	}

	// With a kubeconfig, the flag replaces its server.
	cfg, err := kubeClientConfig(srv.Kubeconfig, "192.0.2.10:6443")
	require.NoError(t, err, "kubeconfig and flag")
	assert.Equal(t, "https://192.0.2.10:6443", cfg.Host, "the flag's server, the kubeconfig's credentials")
	assert.Equal(t, srv.Config.BearerToken, cfg.BearerToken, "the kubeconfig's token")
}
