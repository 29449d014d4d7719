// Package k8ssource feeds services from the Kubernetes API into the model:
// shared informers for Services, EndpointSlices, Nodes and the node's own
// Pods, filtered as kube-proxy filters them. Nothing reaches the model
// before every cache has synced, so a restarting agent never writes a
// partial state over live services.
package k8ssource

import (
	"cmp"
	"context"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/weirnet/weir/core/model"
)

// Name is the source's name in the model store.
const Name = "kubernetes"

// Labels kube-proxy honours: a service another proxy serves, and the
// EndpointSlices of headless services.
const (
	labelServiceProxyName = "service.kubernetes.io/service-proxy-name"
	labelHeadless         = "service.kubernetes.io/headless"
)

// Source watches the API and keeps the model's Kubernetes services.
type Source struct {
	client kubernetes.Interface
	node   string
	store  *model.Store
	log    *slog.Logger

	services  corelisters.ServiceLister
	slices    discoverylisters.EndpointSliceLister
	nodes     corelisters.NodeLister
	pods      corelisters.PodLister
	podSynced cache.InformerSynced
	factories []informers.SharedInformerFactory
	synced    []cache.InformerSynced

	mu         sync.Mutex
	dirty      map[model.ServiceName]bool
	all        bool
	nodesDirty bool
	wake       chan struct{}
	current    map[model.ServiceName]*model.Service
	onNode     []func(*corev1.Node)
	lastNode   *corev1.Node
	// unserved is what was last reported as not served, by service.
	unserved map[model.ServiceName]string
}

// New builds the source and registers its handlers; nothing talks to the
// API until Run. The store expects this source from now on: its snapshot
// is not authoritative until the first full sync.
func New(client kubernetes.Interface, nodeName string, store *model.Store, log *slog.Logger) *Source {
	if log == nil {
		log = slog.Default()
	}
	s := &Source{client: client, node: nodeName, store: store, log: log,
		dirty: map[model.ServiceName]bool{}, wake: make(chan struct{}, 1), current: map[model.ServiceName]*model.Service{}}
	store.Expect(Name)

	noProxyName, _ := labels.NewRequirement(labelServiceProxyName, selection.DoesNotExist, nil)
	noHeadless, _ := labels.NewRequirement(labelHeadless, selection.DoesNotExist, nil)
	svcSel := labels.NewSelector().Add(*noProxyName).String()
	sliceSel := labels.NewSelector().Add(*noProxyName, *noHeadless).String()

	svcFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = svcSel }))
	sliceFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sliceSel }))
	nodeFactory := informers.NewSharedInformerFactory(client, 0)
	podFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", nodeName).String()
		}))
	s.factories = []informers.SharedInformerFactory{svcFactory, sliceFactory, nodeFactory, podFactory}

	svcInf := svcFactory.Core().V1().Services()
	sliceInf := sliceFactory.Discovery().V1().EndpointSlices()
	nodeInf := nodeFactory.Core().V1().Nodes()
	// The node's own pods: endpoints whose pod is gone (a CNI DEL that never
	// came) are collected against them.
	podInf := podFactory.Core().V1().Pods()
	s.services, s.slices, s.nodes, s.pods = svcInf.Lister(), sliceInf.Lister(), nodeInf.Lister(), podInf.Lister()
	s.podSynced = podInf.Informer().HasSynced

	// Handlers go in before the factories start, so no event is missed.
	_, _ = svcInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { s.touchObject(o, "") },
		UpdateFunc: func(_, o any) { s.touchObject(o, "") },
		DeleteFunc: func(o any) { s.touchObject(o, "") },
	})
	_, _ = sliceInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { s.touchObject(o, discoveryv1.LabelServiceName) },
		UpdateFunc: func(_, o any) { s.touchObject(o, discoveryv1.LabelServiceName) },
		DeleteFunc: func(o any) { s.touchObject(o, discoveryv1.LabelServiceName) },
	})
	_, _ = nodeInf.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { s.nodeChanged(o) },
		UpdateFunc: func(_, o any) { s.nodeChanged(o) },
		DeleteFunc: func(o any) { s.nodeChanged(o) },
	})
	s.synced = []cache.InformerSynced{svcInf.Informer().HasSynced, sliceInf.Informer().HasSynced,
		nodeInf.Informer().HasSynced, podInf.Informer().HasSynced}
	return s
}

// OnNode registers fn to run with this node's Node object whenever it
// changes (labels, pod CIDRs). Register before Run.
func (s *Source) OnNode(fn func(*corev1.Node)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onNode = append(s.onNode, fn)
}

// Node returns this node's Node object, once seen.
func (s *Source) Node() *corev1.Node {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastNode
}

// PodOnNode implements node.Pods.
func (s *Source) PodOnNode(namespace, name string) (exists, synced bool) {
	if !s.podSynced() {
		return false, false
	}
	_, err := s.pods.Pods(namespace).Get(name)
	return err == nil, true
}

func (s *Source) nodeChanged(o any) {
	s.mu.Lock()
	s.nodesDirty = true
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
	n, ok := o.(*corev1.Node)
	if !ok || n.Name != s.node {
		return
	}
	s.mu.Lock()
	s.lastNode = n
	fns := slices.Clone(s.onNode)
	s.mu.Unlock()
	for _, fn := range fns {
		fn(n)
	}
}

// touchObject marks the service an object belongs to as changed: the
// object itself for a Service, the service named by label for a slice.
func (s *Source) touchObject(o any, label string) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = d.Obj
	}
	m, ok := o.(metav1.Object)
	if !ok {
		return
	}
	name := m.GetName()
	if label != "" {
		if name = m.GetLabels()[label]; name == "" {
			return
		}
	}
	s.mu.Lock()
	s.dirty[model.ServiceName{Namespace: m.GetNamespace(), Name: name}] = true
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Run waits for the API, starts the informers, writes the first full state
// once every cache has synced, then follows changes until ctx ends. An
// unreachable API is retried with backoff; meanwhile the datapath keeps
// what it has.
func (s *Source) Run(ctx context.Context) {
	if !s.waitForAPI(ctx) {
		return
	}
	for _, f := range s.factories {
		f.Start(ctx.Done())
	}
	defer func() {
		for _, f := range s.factories {
			f.Shutdown()
		}
	}()
	start := time.Now()
	if !cache.WaitForCacheSync(ctx.Done(), s.synced...) {
		return
	}
	s.mu.Lock()
	s.all = true
	s.mu.Unlock()
	s.process()
	s.log.Info("Kubernetes caches synced; services follow the API", "took", time.Since(start).Round(time.Millisecond), "services", len(s.current))
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.wake:
			s.process()
		}
	}
}

// waitForAPI asks for the server's version until it answers, logging each
// failure with the time of the next try.
func (s *Source) waitForAPI(ctx context.Context) bool {
	backoff := 500 * time.Millisecond
	for {
		v, err := s.client.Discovery().ServerVersion()
		if err == nil {
			s.log.Info("connected to the Kubernetes API", "version", v.GitVersion)
			return true
		}
		s.log.Error("Kubernetes API unreachable; the datapath keeps its current services", "err", err, "retry_in", backoff)
		select {
		case <-ctx.Done():
			return false
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 30*time.Second)
	}
}

// process recomputes the changed services and hands the source's whole
// state to the store.
func (s *Source) process() {
	s.mu.Lock()
	dirty, all, nodes := s.dirty, s.all, s.nodesDirty || s.all
	s.dirty, s.all, s.nodesDirty = map[model.ServiceName]bool{}, false, false
	s.mu.Unlock()
	if nodes {
		s.processNodes()
	}
	if all {
		svcs, err := s.services.List(labels.Everything())
		if err != nil {
			s.log.Error("listing services", "err", err)
			return
		}
		s.current = map[model.ServiceName]*model.Service{}
		for _, svc := range svcs {
			dirty[model.ServiceName{Namespace: svc.Namespace, Name: svc.Name}] = true
		}
	}
	if len(dirty) == 0 {
		return
	}
	for name := range dirty {
		if m := s.build(name); m != nil {
			s.current[name] = m
		} else {
			delete(s.current, name)
		}
	}
	if err := s.store.Replace(Name, s.resolve()); err != nil {
		// resolve removed what the store checks for; an error here is a
		// bug, and the previous state stays.
		s.log.Error("services not applied", "err", err)
	}
}

// processNodes hands every Node with an IPv4 InternalIP to the store.
func (s *Source) processNodes() {
	list, err := s.nodes.List(labels.Everything())
	if err != nil {
		s.log.Error("listing nodes", "err", err)
		return
	}
	var out []*model.Node
	for _, n := range list {
		m := ConvertNode(n)
		if m == nil {
			s.log.Warn("node skipped: no IPv4 InternalIP", "node", n.Name)
			continue
		}
		out = append(out, m)
	}
	if err := s.store.ReplaceNodes(Name, out); err != nil {
		s.log.Error("nodes not applied", "err", err)
	}
}

// build converts one service from the caches, or returns nil when it is
// gone, filtered, or has nothing Weir serves.
func (s *Source) build(name model.ServiceName) *model.Service {
	svc, err := s.services.Services(name.Namespace).Get(name.Name)
	if err != nil {
		return nil
	}
	sel := labels.SelectorFromSet(labels.Set{discoveryv1.LabelServiceName: name.Name})
	eps, err := s.slices.EndpointSlices(name.Namespace).List(sel)
	if err != nil {
		return nil
	}
	m := Convert(svc, eps)
	s.reportUnserved(name, m)
	if m == nil || len(m.Frontends) == 0 {
		return nil
	}
	if err := m.Validate(); err != nil {
		s.log.Warn("service skipped", "service", name.String(), "err", err)
		return nil
	}
	return m
}

// reportUnserved warns, once per change, about what of a service the
// datapath cannot serve: never accepted silently.
func (s *Source) reportUnserved(name model.ServiceName, m *model.Service) {
	var now string
	if m != nil {
		now = strings.Join(m.Unserved, "; ")
	}
	if s.unserved == nil {
		s.unserved = map[model.ServiceName]string{}
	}
	if s.unserved[name] == now {
		return
	}
	if now == "" {
		delete(s.unserved, name)
		return
	}
	s.unserved[name] = now
	s.log.Warn("part of a service is not served", "service", name.String(), "not served", now)
}

// resolve returns the current services with frontends that two services
// share given to the older service (the API allows overlapping external
// IPs); the younger one loses the frontend, with a warning.
func (s *Source) resolve() []*model.Service {
	type aged struct {
		m       *model.Service
		created time.Time
	}
	var list []aged
	for name, m := range s.current {
		var created time.Time
		if svc, err := s.services.Services(name.Namespace).Get(name.Name); err == nil {
			created = svc.CreationTimestamp.Time
		}
		list = append(list, aged{m, created})
	}
	slices.SortFunc(list, func(a, b aged) int {
		return cmp.Or(a.created.Compare(b.created), cmp.Compare(a.m.Name.String(), b.m.Name.String()))
	})
	owner := map[model.FrontendKey]model.ServiceName{}
	out := make([]*model.Service, 0, len(list))
	for _, a := range list {
		m := a.m
		keep := make([]model.Frontend, 0, len(m.Frontends))
		for _, f := range m.Frontends {
			if o, taken := owner[f.Key()]; taken {
				s.log.Warn("frontend already used by an older service; ignored", "service", m.Name.String(), "frontend", f.Key().String(), "owner", o.String())
				continue
			}
			owner[f.Key()] = m.Name
			keep = append(keep, f)
		}
		if len(keep) != len(m.Frontends) {
			c := *m
			c.Frontends = keep
			m = &c
		}
		out = append(out, m)
	}
	return out
}
