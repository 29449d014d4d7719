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
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/weirnet/weir/core/api"
	"github.com/weirnet/weir/core/cputime"
	"github.com/weirnet/weir/core/kube"
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
	client *kube.Client
	node   string
	store  *model.Store
	log    *slog.Logger

	services cache.Indexer
	// slicesOf are the cached slices of each service, kept by the
	// slice handlers (an informer index costs a set per service).
	sliceMu   sync.Mutex
	slicesOf  map[model.ServiceName][]*endpointSlice
	nodes     corelisters.NodeLister
	pods      corelisters.PodLister
	podSynced cache.InformerSynced
	informers []cache.SharedIndexInformer
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
func New(client *kube.Client, nodeName string, store *model.Store, log *slog.Logger) *Source {
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

	// Caches keep compact records of only what conversion reads (see
	// trim.go): at tens of thousands of services the objects as served
	// dominate the agent's memory.
	svcInf := client.Informer(kube.Services, func(o *metav1.ListOptions) { o.LabelSelector = svcSel }, trimService)
	sliceInf := client.Informer(kube.EndpointSlices, func(o *metav1.ListOptions) { o.LabelSelector = sliceSel }, trimSlice)
	nodeInf := client.Informer(kube.Nodes, nil, trimNode)
	// The node's own pods: endpoints whose pod is gone (a CNI DEL that never
	// came) are collected against them.
	podInf := client.Informer(kube.Pods, func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", nodeName).String()
	}, trimPod)
	s.informers = []cache.SharedIndexInformer{svcInf, sliceInf, nodeInf, podInf}
	s.services = svcInf.GetIndexer()
	s.nodes = corelisters.NewNodeLister(nodeInf.GetIndexer())
	s.pods = corelisters.NewPodLister(podInf.GetIndexer())
	s.slicesOf = map[model.ServiceName][]*endpointSlice{}
	s.podSynced = podInf.HasSynced

	// Handlers go in before the factories start, so no event is missed.
	_, _ = svcInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { s.touchObject(o) },
		UpdateFunc: func(_, o any) { s.touchObject(o) },
		DeleteFunc: func(o any) { s.touchObject(o) },
	})
	_, _ = sliceInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(o any) { s.sliceChanged(nil, o) },
		UpdateFunc: func(old, o any) {
			s.sliceChanged(old, o)
			s.touchObject(old) // a slice that moved to another service
		},
		DeleteFunc: func(o any) { s.sliceChanged(o, nil) },
	})
	_, _ = nodeInf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(o any) { s.nodeChanged(o) },
		UpdateFunc: func(_, o any) { s.nodeChanged(o) },
		DeleteFunc: func(o any) { s.nodeChanged(o) },
	})
	s.synced = []cache.InformerSynced{svcInf.HasSynced, sliceInf.HasSynced, nodeInf.HasSynced, podInf.HasSynced}
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

// sliceChanged files a slice under its service (and out of the one it
// was under), then marks the service changed.
func (s *Source) sliceChanged(old, now any) {
	unwrap := func(o any) *endpointSlice {
		if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
			o = d.Obj
		}
		es, _ := o.(*endpointSlice)
		return es
	}
	s.sliceMu.Lock()
	if es := unwrap(old); es != nil && es.service != "" {
		k := model.ServiceName{Namespace: es.Namespace, Name: es.service}
		list := slices.DeleteFunc(s.slicesOf[k], func(o *endpointSlice) bool { return o.Name == es.Name })
		if len(list) == 0 {
			delete(s.slicesOf, k)
		} else {
			s.slicesOf[k] = list
		}
	}
	if es := unwrap(now); es != nil && es.service != "" {
		k := model.ServiceName{Namespace: es.Namespace, Name: es.service}
		list := slices.DeleteFunc(s.slicesOf[k], func(o *endpointSlice) bool { return o.Name == es.Name })
		s.slicesOf[k] = append(list, es)
	}
	s.sliceMu.Unlock()
	if now != nil {
		s.touchObject(now)
	} else {
		s.touchObject(old)
	}
}

// touchObject marks the service an object belongs to as changed: the
// object itself for a Service, the service it names for a slice.
func (s *Source) touchObject(o any) {
	if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
		o = d.Obj
	}
	var name model.ServiceName
	switch r := o.(type) {
	case *service:
		name = model.ServiceName{Namespace: r.Namespace, Name: r.Name}
	case *endpointSlice:
		if r.service == "" {
			return
		}
		name = model.ServiceName{Namespace: r.Namespace, Name: r.service}
	default:
		return
	}
	s.mu.Lock()
	s.dirty[name] = true
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
	var wg sync.WaitGroup
	defer wg.Wait()
	for _, inf := range s.informers {
		wg.Go(func() { inf.RunWithContext(ctx) })
	}
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
		v, err := s.client.ServerVersion(ctx)
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
	// On one thread throughout, so its CPU time is this work's (locked
	// only while working: a goroutine locked while it waits wakes later).
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cpu := cputime.Thread()
	s.mu.Lock()
	dirty, all, nodes := s.dirty, s.all, s.nodesDirty || s.all
	s.dirty, s.all, s.nodesDirty = map[model.ServiceName]bool{}, false, false
	s.mu.Unlock()
	if nodes {
		s.processNodes()
	}
	if all {
		for _, o := range s.services.List() {
			if svc, ok := o.(*service); ok {
				dirty[model.ServiceName{Namespace: svc.Namespace, Name: svc.Name}] = true
			}
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
	took := cputime.Thread() - cpu
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
	key := name.Namespace + "/" + name.Name
	o, exists, err := s.services.GetByKey(key)
	svc, ok := o.(*service)
	if err != nil || !exists || !ok {
		return nil
	}
	s.sliceMu.Lock()
	eps := slices.Clone(s.slicesOf[name])
	s.sliceMu.Unlock()
	m := convert(svc, eps)
	s.reportUnserved(name, m)
	if m == nil || len(m.Frontends) == 0 {
		return nil
	}
	if err := m.Validate(); err != nil {
		s.log.Warn("service skipped", "service", name.String(), "err", err)
		return nil
	}
	return &built{svc: m, created: svc.Created}
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
