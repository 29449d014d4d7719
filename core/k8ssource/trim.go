package k8ssource

import (
	"unique"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The informers' transforms: each cache keeps only what conversion, the
// ownership of frontends (creation time) and the informers themselves
// (name, namespace, resource version) read. Managed fields alone are
// often half of an object as served. Transforms may see an object more
// than once, and objects of other types pass unchanged.

// lastApplied is kubectl's copy of the whole object as applied.
const lastApplied = "kubectl.kubernetes.io/last-applied-configuration"

func trimMeta(m *metav1.ObjectMeta) {
	m.ManagedFields = nil
	m.OwnerReferences = nil
}

func trimService(o any) (any, error) {
	svc, ok := o.(*corev1.Service)
	if !ok {
		return o, nil
	}
	trimMeta(&svc.ObjectMeta)
	if _, ok := svc.Annotations[lastApplied]; ok {
		delete(svc.Annotations, lastApplied)
	}
	return svc, nil
}

func trimSlice(o any) (any, error) {
	es, ok := o.(*discoveryv1.EndpointSlice)
	if !ok {
		return o, nil
	}
	trimMeta(&es.ObjectMeta)
	es.Annotations = nil
	for i := range es.Endpoints {
		ep := &es.Endpoints[i]
		ep.TargetRef = nil
		ep.Hostname = nil
		ep.DeprecatedTopology = nil
		// Thousands of endpoints name the same few nodes and zones.
		ep.NodeName = intern(ep.NodeName)
		ep.Zone = intern(ep.Zone)
	}
	return es, nil
}

func intern(s *string) *string {
	if s == nil {
		return nil
	}
	v := unique.Make(*s).Value()
	return &v
}

func trimNode(o any) (any, error) {
	n, ok := o.(*corev1.Node)
	if !ok {
		return o, nil
	}
	trimMeta(&n.ObjectMeta)
	n.Annotations = nil
	n.Status.Images = nil
	n.Status.VolumesAttached = nil
	n.Status.VolumesInUse = nil
	return n, nil
}

// trimPod keeps a pod's identity only: the agent asks whether a pod
// exists.
func trimPod(o any) (any, error) {
	p, ok := o.(*corev1.Pod)
	if !ok {
		return o, nil
	}
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{
		Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion,
		DeletionTimestamp: p.DeletionTimestamp,
	}, Spec: corev1.PodSpec{NodeName: p.Spec.NodeName}}, nil
}
