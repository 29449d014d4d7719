package lab

import (
	"context"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/weirnet/weir/core/lab/controlplane/cptest"
	"github.com/weirnet/weir/examples/k8s/install"
)

// The install manifests are accepted by a real API server as they are
// (the ConfigMap and DaemonSet admitted in a dry run: no kubelet here
// would run the image), and the agent's service account may do exactly
// what the agent does: read nodes, list and watch services, pods and
// EndpointSlices; nothing else.
func TestInstallManifests(t *testing.T) {
	cp := cptest.Start(t)
	c := cptest.Client(t, cp)
	ctx := context.Background()
	objs, err := InstallObjects()
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]bool{}
	for _, obj := range objs {
		_, dry := obj.(*appsv1.DaemonSet)
		if _, cm := obj.(*corev1.ConfigMap); cm {
			dry = true
		}
		if err := CreateInstallObject(ctx, c, obj, dry); err != nil {
			t.Fatalf("creating %T: %v", obj, err)
		}
		kinds[obj.GetObjectKind().GroupVersionKind().Kind] = true
	}
	for _, k := range []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"} {
		if !kinds[k] {
			t.Errorf("the manifests have no %s", k)
		}
	}

	user := "system:serviceaccount:" + install.Namespace + ":" + install.ServiceAccount
	can := func(verb, group, resource string) bool {
		t.Helper()
		r, err := c.AuthorizationV1().SubjectAccessReviews().Create(ctx, &authzv1.SubjectAccessReview{Spec: authzv1.SubjectAccessReviewSpec{
			User: user, Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + install.Namespace, "system:authenticated"},
			ResourceAttributes: &authzv1.ResourceAttributes{Verb: verb, Group: group, Resource: resource},
		}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return r.Status.Allowed
	}
	for _, a := range []struct{ verb, group, resource string }{
		{"get", "", "nodes"}, {"list", "", "nodes"}, {"watch", "", "nodes"},
		{"list", "", "services"}, {"watch", "", "services"},
		{"list", "", "pods"}, {"watch", "", "pods"},
		{"list", "discovery.k8s.io", "endpointslices"}, {"watch", "discovery.k8s.io", "endpointslices"},
	} {
		if !can(a.verb, a.group, a.resource) {
			t.Errorf("the agent may not %s %s.%s, which it needs", a.verb, a.resource, a.group)
		}
	}
	for _, a := range []struct{ verb, group, resource string }{
		{"get", "", "secrets"}, {"list", "", "secrets"}, {"create", "", "pods"}, {"delete", "", "pods"},
		{"update", "", "nodes"}, {"patch", "", "nodes"}, {"update", "", "services"}, {"create", "discovery.k8s.io", "endpointslices"},
		{"get", "", "configmaps"},
	} {
		if can(a.verb, a.group, a.resource) {
			t.Errorf("the agent may %s %s.%s, which it does not need", a.verb, a.resource, a.group)
		}
	}
}
