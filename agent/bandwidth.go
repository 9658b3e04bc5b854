package agent

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
)

// EgressBandwidthAnnotation is the pod annotation the Bandwidth Manager
// enforces (PodNetwork.Bandwidth): EDT at the node devices, as Cilium.
const EgressBandwidthAnnotation = "kubernetes.io/egress-bandwidth"

// Limits as the bandwidth CNI plugin and Cilium take them: below 1 kbit/s a
// pacer spaces packets by seconds, above 1 Pbit/s no device is that fast.
const (
	minEgressBandwidth = 1_000
	maxEgressBandwidth = 1_000_000_000_000_000
)

// podEgressBandwidth returns the pod's egress rate in bit/s from its
// annotation, 0 when it has none. "10M" is 10 Mbit/s (resource.Quantity, as
// the bandwidth CNI plugin parses it). A bad value is an error naming the pod
// and the annotation.
func podEgressBandwidth(pod *corev1.Pod) (uint64, error) {
	v, ok := pod.Annotations[EgressBandwidthAnnotation]
	if !ok {
		return 0, nil
	}
	q, err := resource.ParseQuantity(v)
	if err != nil {
		return 0, fmt.Errorf("pod %s/%s: annotation %s=%q: %w", pod.Namespace, pod.Name, EgressBandwidthAnnotation, v, err)
	}
	if q.Sign() <= 0 || q.Cmp(*resource.NewQuantity(minEgressBandwidth, resource.DecimalSI)) < 0 ||
		q.Cmp(*resource.NewQuantity(maxEgressBandwidth, resource.DecimalSI)) > 0 {
		return 0, fmt.Errorf("pod %s/%s: annotation %s=%q: rate must be between 1k and 1P bit/s", pod.Namespace, pod.Name, EgressBandwidthAnnotation, v)
	}
	return uint64(q.Value()), nil
}
