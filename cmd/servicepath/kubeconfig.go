package main

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	certutil "k8s.io/client-go/util/cert"
)

// envAPIServer is --k8s-api-server's environment variable.
const envAPIServer = "SERVICEPATH_K8S_API_SERVER"

// serviceAccountDir holds the pod's token and the cluster's CA, where the
// kubelet mounts them (a variable for tests).
var serviceAccountDir = "/var/run/secrets/kubernetes.io/serviceaccount"

// apiServerURL turns host:port or an https URL into the URL client-go
// wants. The token goes only over https, and a path would be ambiguous.
func apiServerURL(s string) (string, error) {
	if !strings.Contains(s, "://") {
		host, port, err := net.SplitHostPort(s)
		if err != nil {
			return "", fmt.Errorf("%q: want host:port or https://host[:port]: %w", s, err)
		}
		if host == "" {
			return "", fmt.Errorf("%q: no host", s)
		}
		if err := checkPort(port); err != nil {
			return "", fmt.Errorf("%q: %w", s, err)
		}
		return "https://" + net.JoinHostPort(host, port), nil
	}
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return "", fmt.Errorf("%q: %w", s, err)
	case u.Scheme != "https":
		return "", fmt.Errorf("%q: scheme %q: the service account token is sent over https only", s, u.Scheme)
	case u.Hostname() == "":
		return "", fmt.Errorf("%q: no host", s)
	case u.User != nil || strings.Trim(u.Path, "/") != "" || u.RawQuery != "" || u.Fragment != "":
		return "", fmt.Errorf("%q: only https://host[:port], without user, path or query", s)
	}
	if u.Port() != "" || strings.HasSuffix(u.Host, ":") {
		if err := checkPort(u.Port()); err != nil {
			return "", fmt.Errorf("%q: %w", s, err)
		}
	}
	return "https://" + u.Host, nil
}

func checkPort(p string) error {
	if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q is not a number from 1 to 65535", p)
	}
	return nil
}

// kubeClientConfig is the kubeconfig file when given, else the pod's
// in-cluster credentials. apiServer, when set, replaces the server either
// names: without kube-proxy nothing translates the `kubernetes` cluster IP
// the in-cluster config points at before the agent has programmed it
// (Cilium's k8sServiceHost and k8sServicePort).
func kubeClientConfig(kubeconfig, apiServer string) (*rest.Config, error) {
	var host string
	if apiServer != "" {
		var err error
		if host, err = apiServerURL(apiServer); err != nil {
			return nil, fmt.Errorf("--k8s-api-server (or $%s): %w", envAPIServer, err)
		}
	}
	if kubeconfig != "" || host == "" {
		cfg, err := clientcmd.BuildConfigFromFlags(host, kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("kubernetes client config: %w", err)
		}
		return cfg, nil
	}
	// rest.InClusterConfig with another host.
	tokenFile, caFile := filepath.Join(serviceAccountDir, "token"), filepath.Join(serviceAccountDir, "ca.crt")
	token, err := os.ReadFile(tokenFile)
	if err != nil {
		return nil, fmt.Errorf("in-cluster credentials for %s: %w", host, err)
	}
	if len(strings.TrimSpace(string(token))) == 0 {
		return nil, fmt.Errorf("in-cluster credentials for %s: %s is empty", host, tokenFile)
	}
	if _, err := certutil.NewPool(caFile); err != nil {
		return nil, fmt.Errorf("in-cluster credentials for %s: %w", host, err)
	}
	return &rest.Config{
		Host:            host,
		TLSClientConfig: rest.TLSClientConfig{CAFile: caFile},
		BearerToken:     string(token),
		// Re-read as the kubelet rotates it.
		BearerTokenFile: tokenFile,
	}, nil
}

// apiServerFlag is --k8s-api-server, else its environment variable.
func apiServerFlag(flagValue string) string {
	if flagValue != "" {
		return flagValue
	}
	return os.Getenv(envAPIServer)
}
