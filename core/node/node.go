// Package node holds what the agent knows about the node it runs on; modules
// receive it through fx.
package node

// Info describes the node.
type Info struct {
	Name   string
	Labels map[string]string
	// Pool is the node pool whose settings apply ("" for none).
	Pool string
	// PinDir is the node's bpffs directory.
	PinDir string
	// StateDir holds the agent's files that must survive restarts.
	StateDir string
	// Cgroup is the cgroup v2 directory whose sockets the node's socket
	// hooks see.
	Cgroup string
	// Uplink is the device toward other nodes; not Valid when none was
	// found (a single-node setup may have none).
	Uplink Uplink
}

// Pods tells whether a pod is bound to this node, as the cluster sees it.
// It is provided when the agent follows Kubernetes.
type Pods interface {
	// PodOnNode reports whether the pod exists on this node; synced is
	// false while the view is still loading (no answer can be trusted).
	PodOnNode(namespace, name string) (exists, synced bool)
}
