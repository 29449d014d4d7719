// Package k8ssource feeds services from the Kubernetes API into the model:
// shared informers for Services, EndpointSlices, Nodes and the node's own
// Pods, filtered as kube-proxy filters them. Nothing reaches the model
// before every cache has synced, so a restarting agent never writes a
// partial state over live services.
//
// A change costs in proportion to the services it touches: slices are
// indexed by their service, frontends two services claim are settled
// among their claimants only, and only changed services reach the store.
package k8ssource

import (
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
	"k8s.io/client-go/tools/cache"

	"github.com/weirnet/weir/core/api"
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

// byService indexes EndpointSlices by "namespace/service".
const byService = "weir/service"

// Source watches the API and keeps the model's Kubernetes services.
type Source struct {
	client kubernetes.Interface
	node   string
	store  *model.Store
	log    *slog.Logger

	services  corelisters.ServiceLister
	slices    cache.Indexer
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
	onNode     []func(*corev1.Node)
	lastNode   *corev1.Node
	stats      Stats

	// Owned by the processing goroutine.
	//
	// built are the services as converted, with every frontend;
	// claims who claims each frontend, oldest first; emitted what the
	// store holds of each (the frontends it won); refused the services
	// the store refused, by why, tried again each round.
	built   map[model.ServiceName]*built
	claims  map[model.FrontendKey][]model.ServiceName
	emitted map[model.ServiceName]*model.Service
	refused map[model.ServiceName]string
	// unserved is what was last reported as not served, by service.
	unserved map[model.ServiceName]string
}

// built is a converted service and its age, which settles frontends two
// services claim (the API allows overlapping external IPs).
type built struct {
	svc     *model.Service
	created time.Time
}

// Stats say what the source did: whether and how fast its caches synced,
// the rounds of changes it handed on and their time, and the services the
// store refused.
type Stats = api.KubeStatus

// New builds the source and registers its handlers; nothing talks to the
// API until Run. The store expects this source from now on: its snapshot
// is not authoritative until the first full sync.
func New(client kubernetes.Interface, nodeName string, store *model.Store, log *slog.Logger) *Source {
	if log == nil {
		log = slog.Default()
	}
	s := &Source{client: client, node: nodeName, store: store, log: log,
		dirty: map[model.ServiceName]bool{}, wake: make(chan struct{}, 1),
		built: map[model.ServiceName]*built{}, claims: map[model.FrontendKey][]model.ServiceName{},
		emitted: map[model.ServiceName]*model.Service{}, refused: map[model.ServiceName]string{}}
	store.Expect(Name)

	noProxyName, _ := labels.NewRequirement(labelServiceProxyName, selection.DoesNotExist, nil)
	noHeadless, _ := labels.NewRequirement(labelHeadless, selection.DoesNotExist, nil)
	svcSel := labels.NewSelector().Add(*noProxyName).String()
	sliceSel := labels.NewSelector().Add(*noProxyName, *noHeadless).String()

	// Caches keep only what conversion reads (see trim.go): at tens of
	// thousands of services the objects as served dominate the agent's
	// memory.
	svcFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = svcSel }),
		informers.WithTransform(trimService))
	sliceFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sliceSel }),
		informers.WithTransform(trimSlice))
	nodeFactory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(trimNode))
	podFactory := informers.NewSharedInformerFactoryWithOptions(client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", nodeName).String()
		}),
		informers.WithTransform(trimPod))
	s.factories = []informers.SharedInformerFactory{svcFactory, sliceFactory, nodeFactory, podFactory}

	svcInf := svcFactory.Core().V1().Services()
	sliceInf := sliceFactory.Discovery().V1().EndpointSlices()
	nodeInf := nodeFactory.Core().V1().Nodes()
	// The node's own pods: endpoints whose pod is gone (a CNI DEL that never
	// came) are collected against them.
	podInf := podFactory.Core().V1().Pods()
	_ = sliceInf.Informer().AddIndexers(cache.Indexers{byService: func(o any) ([]string, error) {
		m, ok := o.(metav1.Object)
		if !ok {
			return nil, nil
		}
		name := m.GetLabels()[discoveryv1.LabelServiceName]
		if name == "" {
			return nil, nil
		}
		return []string{m.GetNamespace() + "/" + name}, nil
	}})
	s.services, s.slices, s.nodes, s.pods = svcInf.Lister(), sliceInf.Informer().GetIndexer(), nodeInf.Lister(), podInf.Lister()
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

// Stats returns what the source did so far.
func (s *Source) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.stats
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
	took := time.Since(start)
	s.mu.Lock()
	s.stats.Synced, s.stats.SyncMillis = true, took.Milliseconds()
	s.mu.Unlock()
	s.log.Info("Kubernetes caches synced; services follow the API", "took", took.Round(time.Millisecond), "services", len(s.emitted))
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

// process converts the changed services and hands what changed to the
// store: on the first round every service, as the source's full state.
func (s *Source) process() {
	start := time.Now()
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
		for _, svc := range svcs {
			dirty[model.ServiceName{Namespace: svc.Namespace, Name: svc.Name}] = true
		}
	}
	// Services whose frontends' owners may have changed, and those the
	// store refused before (room may have been made since).
	out := map[model.ServiceName]bool{}
	for name := range s.refused {
		out[name] = true
	}
	for name := range dirty {
		s.rebuild(name, out)
	}
	var upserts []*model.Service
	var deletes []model.ServiceName
	for name := range out {
		next := s.resolve(name)
		prev := s.emitted[name]
		_, wasRefused := s.refused[name]
		switch {
		case next == nil && prev == nil:
			delete(s.refused, name)
		case next == nil:
			deletes = append(deletes, name)
		case prev == nil || wasRefused || !prev.Equal(next):
			upserts = append(upserts, next)
		}
	}
	if len(upserts) > 0 || len(deletes) > 0 || all {
		s.hand(upserts, deletes, all)
	}
	took := time.Since(start)
	s.mu.Lock()
	s.stats.Rounds++
	s.stats.Changed += uint64(len(upserts) + len(deletes))
	s.stats.WorkMicros += uint64(took.Microseconds())
	s.stats.Services = len(s.emitted)
	s.stats.Refused = len(s.refused)
	s.mu.Unlock()
}

// hand gives the store a round's changes: together when it takes them
// all, else one service at a time, so that one service the store refuses
// (the datapath is full) does not hold back the others.
func (s *Source) hand(upserts []*model.Service, deletes []model.ServiceName, sync bool) {
	done := func(svc *model.Service, name model.ServiceName) {
		if svc == nil {
			delete(s.emitted, name)
		} else {
			s.emitted[name] = svc
		}
		delete(s.refused, name)
	}
	err := s.store.Update(Name, upserts, deletes)
	if err == nil {
		for _, name := range deletes {
			done(nil, name)
		}
		for _, svc := range upserts {
			done(svc, svc.Name)
		}
	} else {
		slices.SortFunc(upserts, func(a, b *model.Service) int { return strings.Compare(a.Name.String(), b.Name.String()) })
		for _, name := range deletes {
			s.store.Delete(Name, name)
			done(nil, name)
		}
		for _, svc := range upserts {
			if err := s.store.Upsert(Name, svc); err != nil {
				if s.refused[svc.Name] != err.Error() {
					s.log.Warn("service not applied; the datapath keeps its previous state for it", "service", svc.Name.String(), "err", err)
				}
				s.refused[svc.Name] = err.Error()
				s.mu.Lock()
				s.stats.LastError = svc.Name.String() + ": " + err.Error()
				s.mu.Unlock()
				continue
			}
			done(svc, svc.Name)
		}
	}
	if sync {
		s.store.MarkSynced(Name)
	}
}

// rebuild converts one service again and updates the claims on its
// frontends; out collects every service whose result may have changed.
func (s *Source) rebuild(name model.ServiceName, out map[model.ServiceName]bool) {
	out[name] = true
	var old []model.FrontendKey
	if b := s.built[name]; b != nil {
		for _, f := range b.svc.Frontends {
			old = append(old, f.Key())
		}
	}
	b := s.build(name)
	if b == nil {
		delete(s.built, name)
	} else {
		s.built[name] = b
	}
	var now []model.FrontendKey
	if b != nil {
		for _, f := range b.svc.Frontends {
			now = append(now, f.Key())
		}
	}
	for _, k := range old {
		s.claims[k] = slices.DeleteFunc(s.claims[k], func(n model.ServiceName) bool { return n == name })
		if len(s.claims[k]) == 0 {
			delete(s.claims, k)
		}
	}
	for _, k := range now {
		c := s.claims[k]
		i, _ := slices.BinarySearchFunc(c, name, s.older)
		s.claims[k] = slices.Insert(c, i, name)
	}
	for _, k := range slices.Concat(old, now) {
		for _, n := range s.claims[k] {
			out[n] = true
		}
	}
}

// older orders claimants of a frontend: the older service first, then by
// name.
func (s *Source) older(a, b model.ServiceName) int {
	ba, bb := s.built[a], s.built[b]
	if c := ba.created.Compare(bb.created); c != 0 {
		return c
	}
	return strings.Compare(a.String(), b.String())
}

// resolve returns a service with the frontends it won: a frontend two
// services claim belongs to the older one; the younger loses it, with a
// warning.
func (s *Source) resolve(name model.ServiceName) *model.Service {
	b := s.built[name]
	if b == nil {
		return nil
	}
	m := b.svc
	keep := make([]model.Frontend, 0, len(m.Frontends))
	for _, f := range m.Frontends {
		if owner := s.claims[f.Key()][0]; owner != name {
			s.log.Warn("frontend already used by an older service; ignored", "service", name.String(), "frontend", f.Key().String(), "owner", owner.String())
			continue
		}
		keep = append(keep, f)
	}
	if len(keep) == len(m.Frontends) {
		return m
	}
	c := *m
	c.Frontends = keep
	c.Unserved = slices.Clone(m.Unserved)
	return &c
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
func (s *Source) build(name model.ServiceName) *built {
	svc, err := s.services.Services(name.Namespace).Get(name.Name)
	if err != nil {
		return nil
	}
	objs, err := s.slices.ByIndex(byService, name.Namespace+"/"+name.Name)
	if err != nil {
		return nil
	}
	eps := make([]*discoveryv1.EndpointSlice, 0, len(objs))
	for _, o := range objs {
		if es, ok := o.(*discoveryv1.EndpointSlice); ok {
			eps = append(eps, es)
		}
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
	return &built{svc: m, created: svc.CreationTimestamp.Time}
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
