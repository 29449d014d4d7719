// Package install holds the manifests that install Weir into a cluster
// (DaemonSet, RBAC, configuration), embedded so the lab runs its agents
// with exactly the rights they grant and tests create them against a real
// API server.
package install

import "embed"

// Manifests are the YAML files of this folder.
//
//go:embed *.yaml
var Manifests embed.FS

// Files lists them in the order they are applied.
var Files = []string{"namespace.yaml", "serviceaccount.yaml", "rbac.yaml", "configmap.yaml", "daemonset.yaml"}

// Namespace and ServiceAccount are where the agent runs, and as whom.
const (
	Namespace      = "weir-system"
	ServiceAccount = "weir-agent"
)
