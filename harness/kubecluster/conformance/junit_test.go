package conformance

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// A report as e2e.test v1.34 writes it, cut down.
const sampleJUnit = `<?xml version="1.0" encoding="UTF-8"?>
<testsuites tests="4" disabled="1" errors="0" failures="1" time="40">
  <testsuite name="Kubernetes e2e suite" tests="4" failures="1">
    <testcase name="[SynchronizedBeforeSuite]" classname="Kubernetes e2e suite" status="passed" time="0.1"></testcase>
    <testcase name="[It] [sig-network] Services should serve a basic endpoint from pods [Conformance]" classname="Kubernetes e2e suite" status="passed" time="12.5"></testcase>
    <testcase name="[It] [sig-network] Services should be able to up and down services" classname="Kubernetes e2e suite" status="failed" time="130">
      <failure message="[FAILED] service is not reachable within 2m0s timeout on endpoint up-down-1:80 over TCP protocol&#xA;In [It] at: service.go:776" type="failed">[FAILED] ...</failure>
    </testcase>
    <testcase name="[It] [sig-network] Services should work after restarting kube-proxy [Disruptive]" classname="Kubernetes e2e suite" status="skipped" time="0">
      <skipped message="skipped - Only supported for providers [gce gke] (not local)"></skipped>
    </testcase>
    <testcase name="[ReportAfterSuite] Kubernetes e2e suite report" classname="Kubernetes e2e suite" status="passed" time="0"></testcase>
  </testsuite>
</testsuites>`

func TestParseJUnit(t *testing.T) {
	cases, err := parseJUnit([]byte(sampleJUnit))
	require.NoError(t, err)
	require.Equal(t, []Case{
		{Name: "[sig-network] Services should serve a basic endpoint from pods [Conformance]", Outcome: Pass, Seconds: 12.5},
		{Name: "[sig-network] Services should be able to up and down services", Outcome: Fail, Seconds: 130,
			Reason: "service is not reachable within 2m0s timeout on endpoint up-down-1:80 over TCP protocol"},
		{Name: "[sig-network] Services should work after restarting kube-proxy [Disruptive]", Outcome: Skip,
			Reason: "Only supported for providers [gce gke] (not local)"},
	}, cases)
}

func TestReportTable(t *testing.T) {
	o := Options{Modes: Modes[:2], Focus: "f", Skip: "s"}
	cases, err := parseJUnit([]byte(sampleJUnit))
	require.NoError(t, err)
	r := NewReport(o, map[string][]Case{Modes[0].Name: cases, Modes[1].Name: cases[:1]}, nil, ".")
	require.Len(t, r.Ran(), 2, "the test skipped everywhere is left out of the table")
	md := r.Markdown()
	require.Contains(t, md, "| [sig-network] Services should be able to up and down services | **FAIL** | — |")
	require.Contains(t, md, "| kube-proxy-iptables | 1 | 1 | 0 |")
	require.Contains(t, md, "up and down services, kube-proxy-iptables: service is not reachable")
}

func TestKubectlFailureReason(t *testing.T) {
	msg := "[FAILED] error running /root/.cache/servicepath/kube/cluster-v1.34.10/kubectl --server=https://198.18.254.200:6443 " +
		"--kubeconfig=/var/tmp/k/kubeconfig --namespace=services-1 exec pause-pod-1 -- /bin/sh -x -c curl -q -s --connect-timeout 5 10.96.0.7:80/hostname:\n" +
		"Command stdout:\n\nstderr:\n+ curl -q -s --connect-timeout 5 10.96.0.7:80/hostname\ncommand terminated with exit code 28\n\nerror:\nexit status 28\nIn [It] at: service.go:2716"
	require.Equal(t, "kubectl --namespace=services-1 exec pause-pod-1 -- /bin/sh -x -c curl -q -s --connect-timeout 5 10.96.0.7:80/hostname: exit status 28",
		firstLine(msg))
}
