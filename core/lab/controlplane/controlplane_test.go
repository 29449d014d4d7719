package controlplane_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/weirnet/weir/core/lab/controlplane"
	"github.com/weirnet/weir/core/lab/controlplane/cptest"
)

func TestControlPlaneServesTheAPI(t *testing.T) {
	cp := cptest.Start(t)
	c, err := kubernetes.NewForConfig(cp.RestConfig())
	if err != nil {
		t.Fatal(err)
	}
	v, err := c.Discovery().ServerVersion()
	if err != nil || v.GitVersion != controlplane.Version {
		t.Fatalf("server version %v, %v; want %s", v, err, controlplane.Version)
	}
	ctx := context.Background()
	if _, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "probe"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The kubernetes service exists and points at the advertised address
	// (the API server's bootstrap controller creates it shortly after it
	// serves).
	var svc *corev1.Service
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		svc, err = c.CoreV1().Services("default").Get(ctx, "kubernetes", metav1.GetOptions{})
		if err == nil && svc.Spec.ClusterIP == "10.96.0.1" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("kubernetes service: %v %v", svc, err)
		}
	}

	// A kubeconfig for agents carries the CA and the token.
	kc := filepath.Join(t.TempDir(), "kubeconfig")
	if err := cp.WriteKubeconfig(kc, cp.URL); err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", kc)
	if err != nil || cfg.Host != cp.URL || cfg.BearerToken != cp.Token || len(cfg.CAData) == 0 {
		t.Fatalf("kubeconfig: %+v %v", cfg, err)
	}
	loaded, err := controlplane.Load(cp.Dir)
	if err != nil || loaded.URL != cp.URL || len(loaded.PIDs) != 3 {
		t.Fatalf("Load: %+v %v", loaded, err)
	}
	if _, err := os.Stat(cp.CAFile); err != nil {
		t.Fatal(err)
	}
}
