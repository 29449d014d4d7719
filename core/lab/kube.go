package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/weirnet/weir/core/lab/controlplane"
	"github.com/weirnet/weir/core/lab/kubelet"
	"github.com/weirnet/weir/core/netns"
	"github.com/weirnet/weir/core/proc"
)

// cpName is the control-plane namespace's suffix; its address is .2 of the
// underlay.
const cpName = "cp"

func (l *Lab) cpAddr() netip.Addr {
	return netip.MustParsePrefix(l.Spec.Underlay).Masked().Addr().Next().Next()
}

// startControlPlane runs etcd, kube-apiserver and kube-controller-manager in
// a namespace on the underlay, and writes the kubeconfig agents use.
func (l *Lab) startControlPlane(ctx context.Context) error {
	bits := netip.MustParsePrefix(l.Spec.Underlay).Bits()
	path, err := l.attachHost(l.Spec.Name+"-"+cpName, "u-"+cpName, netip.PrefixFrom(l.cpAddr(), bits))
	if err != nil {
		return fmt.Errorf("control-plane namespace: %w", err)
	}
	cp, err := controlplane.Start(ctx, controlplane.Options{Dir: filepath.Join(l.Dir, cpName), Netns: path, Address: l.cpAddr()})
	if err != nil {
		return err
	}
	l.ControlPlane = cp
	l.AdminKubeconfig = filepath.Join(l.Dir, "kubeconfig")
	if err := cp.WriteKubeconfig(l.AdminKubeconfig, cp.URL); err != nil {
		return err
	}
	c, err := l.Kube()
	if err != nil {
		return err
	}
	token, err := agentCredentials(ctx, c)
	if err != nil {
		return err
	}
	// Agents use the install's service account, not the admin.
	l.Kubeconfig = filepath.Join(l.Dir, "agent.kubeconfig")
	if err := cp.WriteKubeconfigAs(l.Kubeconfig, cp.URL, "weir-agent", token); err != nil {
		return err
	}
	return l.save()
}

// Kube returns a client of the lab's API server (Kubernetes mode only).
func (l *Lab) Kube() (kubernetes.Interface, error) {
	if l.ControlPlane == nil {
		return nil, fmt.Errorf("lab %s runs without Kubernetes", l.Spec.Name)
	}
	return kubernetes.NewForConfig(l.ControlPlane.RestConfig())
}

// registerNode creates the node's Node object: labels, pod CIDR, address,
// and a Ready condition (the lab's kubelet does not heartbeat).
func (l *Lab) registerNode(ctx context.Context, c kubernetes.Interface, n *Node) error {
	labels := map[string]string{"kubernetes.io/hostname": n.Name, "kubernetes.io/os": "linux"}
	for k, v := range n.Labels {
		labels[k] = v
	}
	obj := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: n.Name, Labels: labels},
		Spec:       corev1.NodeSpec{PodCIDR: n.PodCIDR, PodCIDRs: []string{n.PodCIDR}},
	}
	created, err := c.CoreV1().Nodes().Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		return fmt.Errorf("creating Node %s: %w", n.Name, err)
	}
	now := metav1.Now()
	created.Status = corev1.NodeStatus{
		Addresses:  []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: n.IP}, {Type: corev1.NodeHostName, Address: n.Name}},
		Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: now, LastTransitionTime: now, Reason: "LabKubelet"}},
	}
	if _, err := c.CoreV1().Nodes().UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("reporting Node %s ready: %w", n.Name, err)
	}
	return nil
}

// KubeletDir is where the node's kubelet keeps its sandboxes.
func (n *Node) KubeletDir() string { return filepath.Join(filepath.Dir(n.StateDir), "kubelet") }

// podNetnsPrefix names the namespaces of a lab's Kubernetes pods.
func (l *Lab) podNetnsPrefix() string { return l.Spec.Name + "-p" }

// cniConf is the network configuration the node's kubelet passes weir-cni.
func (n *Node) cniConf() []byte {
	return fmt.Appendf(nil, `{"cniVersion":"1.1.0","name":"weir","plugins":[{"type":"weir-cni","agentSocket":%q,"dataDir":%q}]}`,
		n.APISocket, filepath.Join(n.StateDir, "cni"))
}

// KubeletConfig is the node's kubelet configuration.
func (l *Lab) KubeletConfig(n *Node, c kubernetes.Interface) kubelet.Config {
	return kubelet.Config{
		Client: c, Node: n.Name, NodeIP: n.IP, NetnsPrefix: l.podNetnsPrefix(),
		CNIBinDir: l.Binaries.CNIDir, CNIConf: n.cniConf(), ServeBinary: l.Binaries.Serve,
		StateDir: n.KubeletDir(), Cgroup: filepath.Join(n.Cgroup, "pods"), Log: l.Options.Logger.With("kubelet", n.Name),
	}
}

// startKubelet runs the node's kubelet as its own process (weir lab
// kubelet), so it outlives the command that built the lab.
func (l *Lab) startKubelet(n *Node) error {
	pid, err := proc.Start(proc.Spec{Path: l.Binaries.Serve,
		Args:    []string{"lab", "kubelet", "--state-root", l.Options.StateRoot, "--node", n.Name, l.Spec.Name},
		LogFile: filepath.Join(filepath.Dir(n.StateDir), "kubelet.log")})
	if err != nil {
		return fmt.Errorf("starting the kubelet of %s: %w", n.Name, err)
	}
	n.KubeletPID = pid
	return l.save()
}

// workloadArgs are the container args the lab's kubelet hands to
// "weir lab serve".
func workloadArgs(w Workload) []string {
	var args []string
	for flag, port := range map[string]int{"--http": w.HTTP, "--udp": w.UDP, "--echo": w.Echo, "--sink": w.Sink, "--dns": w.DNS, "--source": w.Source} {
		if port != 0 {
			args = append(args, flag+"="+strconv.Itoa(port))
		}
	}
	return args
}

// createSpecPods turns the spec's pods into Pod objects bound to their
// nodes, and waits until they run.
func (l *Lab) createSpecPods(ctx context.Context, c kubernetes.Interface) error {
	for _, ns := range l.Spec.Nodes {
		for _, ps := range ns.Pods {
			pod := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: ps.Name, Namespace: ps.namespace(), Labels: ps.Labels},
				Spec: corev1.PodSpec{NodeName: ns.Name, Containers: []corev1.Container{{
					Name: "main", Image: "weir.dev/lab-workload", Args: workloadArgs(ps.Serve),
				}}},
			}
			if err := ensureNamespace(ctx, c, pod.Namespace); err != nil {
				return err
			}
			if _, err := c.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
				return fmt.Errorf("creating pod %s: %w", ps.Name, err)
			}
		}
	}
	for _, n := range l.Nodes {
		for _, p := range n.Pods {
			if err := l.WaitPodRunning(ctx, c, p); err != nil {
				return err
			}
		}
	}
	return nil
}

func (p PodSpec) namespace() string {
	if p.Namespace == "" {
		return "default"
	}
	return p.Namespace
}

func ensureNamespace(ctx context.Context, c kubernetes.Interface, name string) error {
	_, err := c.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating namespace %s: %w", name, err)
	}
	return nil
}

// WaitPodRunning waits until the kubelet reports the pod ready, and fills
// in its address and namespace path.
func (l *Lab) WaitPodRunning(ctx context.Context, c kubernetes.Interface, p *Pod) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		pod, err := c.CoreV1().Pods(p.Namespace).Get(ctx, p.Name, metav1.GetOptions{})
		if err == nil && pod.Status.PodIP != "" && podReady(pod) {
			p.IP = pod.Status.PodIP
			p.ID = string(pod.UID)
			p.Netns = l.podNetnsPrefix() + strings.ReplaceAll(string(pod.UID), "-", "")[:12]
			return l.save()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pod %s/%s did not become ready: %v", p.Namespace, p.Name, err)
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// stopKube stops the kubelets, the pods' processes they started, and the
// control plane.
func (l *Lab) stopKube() {
	for _, n := range l.Nodes {
		proc.Stop(n.KubeletPID, "kubelet", 10*time.Second)
		files, _ := filepath.Glob(filepath.Join(n.KubeletDir(), "*.json"))
		for _, f := range files {
			var b struct {
				PID int `json:"pid"`
			}
			if data, err := os.ReadFile(f); err == nil && json.Unmarshal(data, &b) == nil {
				proc.Stop(b.PID, "lab", 5*time.Second)
			}
		}
	}
	if l.ControlPlane != nil {
		_ = l.ControlPlane.Stop()
	}
}

// deleteLabNamespaces removes every network namespace whose name carries
// the lab's prefix, including pods the kubelet made.
func (l *Lab) deleteLabNamespaces() []error {
	var errs []error
	entries, _ := os.ReadDir(netns.Dir)
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), l.Spec.Name+"-") {
			if err := netns.Delete(e.Name()); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errs
}
