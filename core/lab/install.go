package lab

import (
	"bytes"
	"context"
	"fmt"
	"io"

	appsv1 "k8s.io/api/apps/v1"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/weirnet/weir/examples/k8s/install"
)

// InstallObjects decodes the install manifests (examples/k8s/install), in
// the order they are applied.
func InstallObjects() ([]runtime.Object, error) {
	var out []runtime.Object
	for _, f := range install.Files {
		data, err := install.Manifests.ReadFile(f)
		if err != nil {
			return nil, err
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
		for {
			var raw runtime.RawExtension
			if err := dec.Decode(&raw); err == io.EOF {
				break
			} else if err != nil {
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			if len(bytes.TrimSpace(raw.Raw)) == 0 {
				continue
			}
			obj, _, err := scheme.Codecs.UniversalDeserializer().Decode(raw.Raw, nil, nil)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", f, err)
			}
			out = append(out, obj)
		}
	}
	return out, nil
}

// CreateInstallObject creates one install object; dryRun asks the API
// server to validate and admit it without storing it.
func CreateInstallObject(ctx context.Context, c kubernetes.Interface, obj runtime.Object, dryRun bool) error {
	opts := metav1.CreateOptions{}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	var err error
	switch o := obj.(type) {
	case *corev1.Namespace:
		_, err = c.CoreV1().Namespaces().Create(ctx, o, opts)
	case *corev1.ServiceAccount:
		_, err = c.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, o, opts)
	case *corev1.ConfigMap:
		_, err = c.CoreV1().ConfigMaps(o.Namespace).Create(ctx, o, opts)
	case *rbacv1.ClusterRole:
		_, err = c.RbacV1().ClusterRoles().Create(ctx, o, opts)
	case *rbacv1.ClusterRoleBinding:
		_, err = c.RbacV1().ClusterRoleBindings().Create(ctx, o, opts)
	case *appsv1.DaemonSet:
		_, err = c.AppsV1().DaemonSets(o.Namespace).Create(ctx, o, opts)
	default:
		return fmt.Errorf("install object of kind %T is not handled", obj)
	}
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	return err
}

// agentCredentials creates the agent's identity from the install
// manifests (namespace, service account, its RBAC) and returns a token
// of that service account: the lab's agents run with exactly the rights
// the install grants, so a missing one fails the lab's tests.
func agentCredentials(ctx context.Context, c kubernetes.Interface) (string, error) {
	objs, err := InstallObjects()
	if err != nil {
		return "", err
	}
	for _, obj := range objs {
		switch obj.(type) {
		case *corev1.Namespace, *corev1.ServiceAccount, *rbacv1.ClusterRole, *rbacv1.ClusterRoleBinding:
			if err := CreateInstallObject(ctx, c, obj, false); err != nil {
				return "", fmt.Errorf("creating the agent's %T: %w", obj, err)
			}
		}
	}
	day := int64(24 * 3600)
	tr, err := c.CoreV1().ServiceAccounts(install.Namespace).CreateToken(ctx, install.ServiceAccount,
		&authv1.TokenRequest{Spec: authv1.TokenRequestSpec{ExpirationSeconds: &day}}, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("a token for the agent's service account: %w", err)
	}
	return tr.Status.Token, nil
}
