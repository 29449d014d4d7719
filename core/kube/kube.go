// Package kube is the agent's Kubernetes client: REST clients for the two
// API groups it reads (core/v1 and discovery/v1) and list-watches for its
// informers, on a scheme that knows only those groups.
//
// client-go's clientset and informer factory link every API group's
// types, clients, listers and apply configurations into the binary: 70 MB
// against 21 MB for the same informers built here. The agent's resident
// memory is about a third its binary's mapped pages, so this is where a
// node's agent keeps tens of megabytes.
package kube

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/version"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// Config builds a client configuration from a kubeconfig file, or from the
// pod's service account when running in a cluster with no file given. It
// returns nil when neither applies or standalone is asked for: the agent
// then runs without Kubernetes.
func Config(kubeconfig string, standalone bool) (*rest.Config, error) {
	var cfg *rest.Config
	var err error
	switch {
	case standalone && kubeconfig != "":
		return nil, errors.New("--standalone and --kubeconfig exclude each other")
	case standalone:
		return nil, nil
	case kubeconfig != "":
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("--kubeconfig %s: %w", kubeconfig, err)
		}
	case os.Getenv("KUBERNETES_SERVICE_HOST") != "":
		if cfg, err = rest.InClusterConfig(); err != nil {
			return nil, fmt.Errorf("in-cluster Kubernetes configuration: %w", err)
		}
	default:
		return nil, nil
	}
	cfg.UserAgent = "weir-agent"
	cfg.QPS, cfg.Burst = 50, 100
	return cfg, nil
}

// scheme knows the groups the agent reads, and the meta types lists and
// watches carry.
var (
	scheme = runtime.NewScheme()
	codecs = serializer.NewCodecFactory(scheme)
	params = runtime.NewParameterCodec(scheme)
)

func init() {
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, discoveryv1.AddToScheme} {
		if err := add(scheme); err != nil {
			panic(err) // generated registrations of two fixed groups
		}
	}
}

// Client reads the API: nodes, services, endpoint slices and pods.
type Client struct {
	core, discovery rest.Interface
}

// New returns a client for cfg. Lists and watches ask for protobuf, as
// kube-proxy does: listing tens of thousands of services and slices
// decodes several times faster than JSON.
func New(cfg *rest.Config) (*Client, error) {
	mk := func(gv schema.GroupVersion, apiPath string) (rest.Interface, error) {
		c := rest.CopyConfig(cfg)
		c.GroupVersion = &gv
		c.APIPath = apiPath
		c.NegotiatedSerializer = codecs.WithoutConversion()
		c.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
		c.ContentType = "application/vnd.kubernetes.protobuf"
		return rest.RESTClientFor(c)
	}
	core, err := mk(corev1.SchemeGroupVersion, "/api")
	if err != nil {
		return nil, fmt.Errorf("Kubernetes client: %w", err)
	}
	disc, err := mk(discoveryv1.SchemeGroupVersion, "/apis")
	if err != nil {
		return nil, fmt.Errorf("Kubernetes client: %w", err)
	}
	return &Client{core: core, discovery: disc}, nil
}

// ServerVersion asks the API server for its version.
func (c *Client) ServerVersion(ctx context.Context) (*version.Info, error) {
	body, err := c.core.Get().AbsPath("/version").Do(ctx).Raw()
	if err != nil {
		return nil, err
	}
	var v version.Info
	if err := json.Unmarshal(body, &v); err != nil {
		return nil, fmt.Errorf("decoding the server version: %w", err)
	}
	return &v, nil
}

// Node gets one Node.
func (c *Client) Node(ctx context.Context, name string) (*corev1.Node, error) {
	var n corev1.Node
	if err := c.core.Get().Resource("nodes").Name(name).Do(ctx).Into(&n); err != nil {
		return nil, err
	}
	return &n, nil
}

// Resource names a kind the client lists and watches.
type Resource int

// The resources the agent follows.
const (
	Services Resource = iota
	EndpointSlices
	Nodes
	Pods
)

func (c *Client) rest(r Resource) (rest.Interface, string, runtime.Object, runtime.Object) {
	switch r {
	case EndpointSlices:
		return c.discovery, "endpointslices", &discoveryv1.EndpointSlice{}, &discoveryv1.EndpointSliceList{}
	case Nodes:
		return c.core, "nodes", &corev1.Node{}, &corev1.NodeList{}
	case Pods:
		return c.core, "pods", &corev1.Pod{}, &corev1.PodList{}
	}
	return c.core, "services", &corev1.Service{}, &corev1.ServiceList{}
}

// Informer returns an informer of a resource in every namespace, whose
// lists and watches tweak may narrow (label and field selectors), and
// whose cache keeps what transform makes of each object. It has no
// indexes.
func (c *Client) Informer(r Resource, tweak func(*metav1.ListOptions), transform cache.TransformFunc) cache.SharedIndexInformer {
	rc, resource, obj, list := c.rest(r)
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			if tweak != nil {
				tweak(&o)
			}
			out := list.DeepCopyObject()
			err := rc.Get().Resource(resource).VersionedParams(&o, params).Do(ctx).Into(out)
			return out, err
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			if tweak != nil {
				tweak(&o)
			}
			o.Watch = true
			return rc.Get().Resource(resource).VersionedParams(&o, params).Watch(ctx)
		},
	}
	inf := cache.NewSharedIndexInformer(lw, obj, 0, cache.Indexers{})
	if transform != nil {
		_ = inf.SetTransform(transform) // before the informer runs: cannot fail
	}
	return inf
}
