// Package kubelet plays kubelet for a lab node: for each Pod bound to the
// node it creates the pod's network namespace, runs the CNI plugin (ADD),
// starts the pod's process, and reports the pod running and ready, so that
// the real EndpointSlice controller turns pods into slices. Deleting a pod
// stops its process, runs CNI DEL and removes the namespace.
package kubelet

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containernetworking/cni/libcni"
	current "github.com/containernetworking/cni/pkg/types/100"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/weirnet/weir/core/netns"
	"github.com/weirnet/weir/core/proc"
)

// Config is one node's kubelet.
type Config struct {
	Client kubernetes.Interface
	Node   string
	// NodeIP is reported as the pods' hostIP.
	NodeIP string
	// NetnsPrefix names pod namespaces (<prefix><uid>).
	NetnsPrefix string
	// CNIBinDir holds weir-cni; CNIConf is the network configuration list.
	CNIBinDir string
	CNIConf   []byte
	// ServeBinary is the weir executable that runs pod workloads.
	ServeBinary string
	// StateDir keeps the kubelet's sandboxes across its restarts.
	StateDir string
	// Cgroup receives pod processes.
	Cgroup string
	Log    *slog.Logger
}

// sandbox is a running pod.
type sandbox struct {
	UID   string `json:"uid"`
	Name  string `json:"name"`
	NS    string `json:"namespace"`
	Netns string `json:"netns"`
	IP    string `json:"ip"`
	PID   int    `json:"pid"`
}

// Kubelet runs pods of one node.
type Kubelet struct {
	cfg   Config
	cni   *libcni.CNIConfig
	conf  *libcni.NetworkConfigList
	mu    sync.Mutex
	boxes map[string]*sandbox // by pod UID
}

// New prepares a kubelet.
func New(cfg Config) (*Kubelet, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	conf, err := libcni.ConfListFromBytes(cfg.CNIConf)
	if err != nil {
		return nil, fmt.Errorf("kubelet: CNI configuration: %w", err)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, err
	}
	k := &Kubelet{cfg: cfg, conf: conf, boxes: map[string]*sandbox{},
		cni: libcni.NewCNIConfigWithCacheDir([]string{cfg.CNIBinDir}, filepath.Join(cfg.StateDir, "cni-cache"), nil)}
	files, _ := filepath.Glob(filepath.Join(cfg.StateDir, "*.json"))
	for _, f := range files {
		var b sandbox
		if data, err := os.ReadFile(f); err == nil && json.Unmarshal(data, &b) == nil {
			k.boxes[b.UID] = &b
		}
	}
	return k, nil
}

func (k *Kubelet) save(b *sandbox) error {
	data, err := json.Marshal(b)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(k.cfg.StateDir, b.UID+".json"), data, 0o600)
}

// Run follows the node's pods until ctx ends. Pods keep running after it
// returns (as with a kubelet restart); Teardown removes them.
func (k *Kubelet) Run(ctx context.Context) error {
	f := informers.NewSharedInformerFactoryWithOptions(k.cfg.Client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", k.cfg.Node).String()
		}))
	inf := f.Core().V1().Pods()
	lister := inf.Lister()
	q := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]())
	defer q.ShutDown()
	enqueue := func(o any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(o); err == nil {
			q.Add(key)
		}
	}
	_, _ = inf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: enqueue, UpdateFunc: func(_, o any) { enqueue(o) }, DeleteFunc: enqueue,
	})
	f.Start(ctx.Done())
	defer f.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), inf.Informer().HasSynced) {
		return ctx.Err()
	}
	// Pods deleted while the kubelet was away.
	k.mu.Lock()
	for _, b := range k.boxes {
		q.Add(b.NS + "/" + b.Name)
	}
	k.mu.Unlock()
	go func() { <-ctx.Done(); q.ShutDown() }()
	for {
		key, quit := q.Get()
		if quit {
			return ctx.Err()
		}
		err := k.sync(ctx, key, lister)
		if err != nil {
			k.cfg.Log.Warn("pod sync failed; retrying", "pod", key, "err", err)
			q.AddRateLimited(key)
		} else {
			q.Forget(key)
		}
		q.Done(key)
	}
}

func (k *Kubelet) sync(ctx context.Context, key string, pods corelisters.PodLister) error {
	ns, name, _ := strings.Cut(key, "/")
	pod, err := pods.Pods(ns).Get(name)
	if apierrors.IsNotFound(err) {
		return k.removeByName(ns, name)
	}
	if err != nil {
		return err
	}
	uid := string(pod.UID)
	k.mu.Lock()
	b := k.boxes[uid]
	k.mu.Unlock()
	// A pod object replaced under the same name: the old sandbox goes.
	if err := k.removeStale(ns, name, uid); err != nil {
		return err
	}
	if pod.DeletionTimestamp != nil {
		if b != nil {
			if err := k.teardown(b); err != nil {
				return err
			}
		}
		// As kubelet does once the pod is stopped: the object can go.
		grace := int64(0)
		err := k.cfg.Client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{
			GracePeriodSeconds: &grace, Preconditions: &metav1.Preconditions{UID: &pod.UID}})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return err
		}
		return nil
	}
	if b != nil || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return nil
	}
	return k.start(ctx, pod)
}

func (k *Kubelet) removeStale(ns, name, uid string) error {
	k.mu.Lock()
	var stale []*sandbox
	for _, b := range k.boxes {
		if b.NS == ns && b.Name == name && b.UID != uid {
			stale = append(stale, b)
		}
	}
	k.mu.Unlock()
	for _, b := range stale {
		if err := k.teardown(b); err != nil {
			return err
		}
	}
	return nil
}

func (k *Kubelet) removeByName(ns, name string) error {
	return k.removeStale(ns, name, "")
}

func (k *Kubelet) rt(b *sandbox) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: b.UID, NetNS: netns.Path(b.Netns), IfName: "eth0",
		Args: [][2]string{{"K8S_POD_NAMESPACE", b.NS}, {"K8S_POD_NAME", b.Name}, {"K8S_POD_UID", b.UID}}}
}

// start creates the sandbox, wires it, starts the workload and reports the
// pod running and ready.
func (k *Kubelet) start(ctx context.Context, pod *corev1.Pod) error {
	uid := string(pod.UID)
	b := &sandbox{UID: uid, Name: pod.Name, NS: pod.Namespace, Netns: k.cfg.NetnsPrefix + strings.ReplaceAll(uid, "-", "")[:12]}
	if _, err := netns.Create(b.Netns); err != nil {
		return err
	}
	fail := func(err error) error {
		_ = k.teardown(b)
		return err
	}
	k.mu.Lock()
	k.boxes[uid] = b
	k.mu.Unlock()
	if err := k.save(b); err != nil {
		return fail(err)
	}
	r, err := k.cni.AddNetworkList(ctx, k.conf, k.rt(b))
	if err != nil {
		return fail(fmt.Errorf("CNI ADD: %w", err))
	}
	res, err := current.NewResultFromResult(r)
	if err != nil || len(res.IPs) == 0 {
		return fail(fmt.Errorf("CNI ADD gave no address (%v)", err))
	}
	b.IP = res.IPs[0].Address.IP.String()
	var args []string
	if len(pod.Spec.Containers) > 0 {
		args = pod.Spec.Containers[0].Args
	}
	if len(args) > 0 {
		pid, err := proc.Start(proc.Spec{Path: k.cfg.ServeBinary, Args: append([]string{"lab", "serve", "--name", pod.Name}, args...),
			Netns: netns.Path(b.Netns), LogFile: filepath.Join(k.cfg.StateDir, uid+".log"), Cgroup: k.cfg.Cgroup})
		if err != nil {
			return fail(err)
		}
		b.PID = pid
		if err := k.waitListening(b, args); err != nil {
			return fail(err)
		}
	}
	if err := k.save(b); err != nil {
		return fail(err)
	}
	if err := k.reportRunning(ctx, pod, b); err != nil {
		return err
	}
	k.cfg.Log.Info("pod running", "pod", pod.Namespace+"/"+pod.Name, "ip", b.IP)
	return nil
}

// waitListening waits until the workload accepts on its first TCP port:
// the pod is ready when it serves, as a readiness probe would find.
func (k *Kubelet) waitListening(b *sandbox, args []string) error {
	port := 0
	for _, a := range args {
		for _, f := range []string{"--http=", "--echo="} {
			if v, ok := strings.CutPrefix(a, f); ok && port == 0 {
				port, _ = strconv.Atoi(v)
			}
		}
	}
	if port == 0 {
		return nil
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := netns.Dial(context.Background(), netns.Path(b.Netns), "tcp4", net.JoinHostPort(b.IP, strconv.Itoa(port)))
		if err == nil {
			c.Close()
			return nil
		}
		if !proc.Alive(b.PID) {
			return fmt.Errorf("the pod's process exited: %s", proc.Tail(filepath.Join(k.cfg.StateDir, b.UID+".log"), 5))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the pod's process does not listen on %d: %v", port, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (k *Kubelet) reportRunning(ctx context.Context, pod *corev1.Pod, b *sandbox) error {
	now := metav1.Now()
	p := pod.DeepCopy()
	p.Status.Phase = corev1.PodRunning
	p.Status.HostIP = k.cfg.NodeIP
	p.Status.HostIPs = []corev1.HostIP{{IP: k.cfg.NodeIP}}
	p.Status.PodIP = b.IP
	p.Status.PodIPs = []corev1.PodIP{{IP: b.IP}}
	p.Status.StartTime = &now
	cond := func(t corev1.PodConditionType) corev1.PodCondition {
		return corev1.PodCondition{Type: t, Status: corev1.ConditionTrue, LastTransitionTime: now}
	}
	p.Status.Conditions = []corev1.PodCondition{cond(corev1.PodScheduled), cond(corev1.PodInitialized), cond(corev1.ContainersReady), cond(corev1.PodReady)}
	p.Status.ContainerStatuses = nil
	for _, c := range p.Spec.Containers {
		p.Status.ContainerStatuses = append(p.Status.ContainerStatuses, corev1.ContainerStatus{
			Name: c.Name, Image: c.Image, Ready: true, Started: ptrTrue(),
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
		})
	}
	_, err := k.cfg.Client.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{})
	return err
}

func ptrTrue() *bool { t := true; return &t }

// teardown stops the pod's process, runs CNI DEL and removes the
// namespace; every step tolerates what is already gone.
func (k *Kubelet) teardown(b *sandbox) error {
	proc.Stop(b.PID, "lab", 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := k.cni.DelNetworkList(ctx, k.conf, k.rt(b)); err != nil {
		return fmt.Errorf("CNI DEL of %s/%s: %w", b.NS, b.Name, err)
	}
	if err := netns.Delete(b.Netns); err != nil {
		return err
	}
	_ = os.Remove(filepath.Join(k.cfg.StateDir, b.UID+".json"))
	_ = os.Remove(filepath.Join(k.cfg.StateDir, b.UID+".log"))
	k.mu.Lock()
	delete(k.boxes, b.UID)
	k.mu.Unlock()
	k.cfg.Log.Info("pod stopped", "pod", b.NS+"/"+b.Name)
	return nil
}
