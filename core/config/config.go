// Package config loads the agent's configuration file: the modules to run,
// their settings, datapath sizing, and node pools that change the module set
// and settings for the nodes their label selector matches.
//
// Everything is validated when the file is loaded, for the top-level module
// set and for every pool alike, so a mistake in one pool fails on every node
// instead of only on the nodes that happen to be in that pool. Resolve then
// only picks one of the precomputed results.
package config

import (
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/weirnet/weir/core/module"
	"github.com/weirnet/weir/core/strictyaml"
)

// Bounds of datapath.ctMaxEntries.
const (
	DefaultCTMaxEntries = 262144
	MinCTMaxEntries     = 1024
)

// Default sizes of the service maps: enough for 100,000 services of 10
// endpoints each (a master entry and 10 slots per service, a million
// backends). The hash maps allocate entries as they are used; the kernel
// reserves their bucket arrays (16 bytes per power-of-two bucket) up front.
const (
	DefaultServicesMaxEntries = 1200000
	DefaultBackendsMaxEntries = 1048576
	DefaultRevNATMaxEntries   = 262144
	DefaultAffinityMaxEntries = 65536
	// DefaultNATMaxEntries matches the conntrack default: two entries
	// per translated flow, as conntrack has.
	DefaultNATMaxEntries = 262144
	// MinMapEntries and MaxMapEntries bound every map size setting.
	MinMapEntries = 1024
	MaxMapEntries = 16777216
)

// File is the configuration file as written.
type File struct {
	// Modules names the modules every node runs unless its pool says
	// otherwise.
	Modules []string `yaml:"modules"`
	// Settings holds one section per module, keyed by module name. The
	// sections stay raw until the module's settings type decodes them.
	Settings  map[string]yaml.Node `yaml:"settings"`
	Datapath  Datapath             `yaml:"datapath"`
	NodePools []NodePool           `yaml:"nodePools"`
	// Plugins declares out-of-tree modules; once declared, a plugin is
	// enabled in modules or a pool by its name like any module, and takes
	// its settings section under that name.
	Plugins []Plugin `yaml:"plugins"`
}

// Plugin declares a go-plugin binary that brings a datapath module.
type Plugin struct {
	// Name is the module name the plugin describes itself with.
	Name string `yaml:"name"`
	// Path is the plugin binary (absolute).
	Path string `yaml:"path"`
	// SHA256 is the binary's checksum (hex); a binary that does not
	// match is not started.
	SHA256 string `yaml:"sha256"`
	// FailurePolicy says what packets meet while the plugin's process is
	// down (it crashed and the agent restarts it): "open" (default), its
	// BPF keeps running as last configured; "closed", its stages drop
	// every packet that reaches them until the process is back.
	FailurePolicy string `yaml:"failurePolicy"`
	// CallTimeout bounds each call to the plugin (a Go duration, default
	// 10s): a plugin that hangs is an error naming the call.
	CallTimeout string `yaml:"callTimeout"`
}

// Plugin failure policies.
const (
	FailOpen   = "open"
	FailClosed = "closed"
)

// DefaultPluginCallTimeout bounds a call to a plugin.
const DefaultPluginCallTimeout = 10 * time.Second

// Timeout is the plugin's call timeout.
func (p Plugin) Timeout() time.Duration {
	d, err := time.ParseDuration(p.CallTimeout)
	if err != nil || p.CallTimeout == "" {
		return DefaultPluginCallTimeout
	}
	return d
}

// ReadPlugins reads only the plugins section of the configuration file at
// path, checked: the agent starts them to learn the modules they bring
// before it loads the rest against its catalog.
func ReadPlugins(path string) ([]Plugin, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	root, err := strictyaml.Parse(path, data)
	if err != nil {
		return nil, err
	}
	var f struct {
		Plugins []Plugin `yaml:"plugins"`
	}
	doc := root
	if doc.Kind == yaml.DocumentNode && len(doc.Content) > 0 {
		doc = doc.Content[0]
	}
	if doc.Kind != yaml.MappingNode {
		return nil, nil
	}
	for i := 0; i+1 < len(doc.Content); i += 2 {
		if doc.Content[i].Value != "plugins" {
			continue
		}
		if err := strictyaml.DecodeNode(path, doc.Content[i+1], "plugins", &f.Plugins); err != nil {
			return nil, err
		}
		for j, p := range f.Plugins {
			if err := p.check(); err != nil {
				return nil, strictyaml.At(path, doc.Content[i+1].Content[j], fmt.Sprintf("plugins[%d]", j), err.Error())
			}
			if k := slices.IndexFunc(f.Plugins[:j], func(o Plugin) bool { return o.Name == p.Name }); k >= 0 {
				return nil, strictyaml.At(path, doc.Content[i+1].Content[j], fmt.Sprintf("plugins[%d].name", j), fmt.Sprintf("plugin %q is already declared as plugins[%d]", p.Name, k))
			}
		}
	}
	return f.Plugins, nil
}

func (p Plugin) check() error {
	switch {
	case p.Name == "" || strings.ContainsAny(p.Name, " \t/"):
		return fmt.Errorf("name %q is not a plain word (the module name the plugin describes itself with)", p.Name)
	case !filepath.IsAbs(p.Path):
		return fmt.Errorf("path %q is not an absolute path to the plugin binary", p.Path)
	case len(p.SHA256) != 64 || strings.Trim(strings.ToLower(p.SHA256), "0123456789abcdef") != "":
		return fmt.Errorf("sha256 %q is not a SHA-256 checksum (64 hex digits; sha256sum prints it)", p.SHA256)
	case p.FailurePolicy != "" && p.FailurePolicy != FailOpen && p.FailurePolicy != FailClosed:
		return fmt.Errorf("failurePolicy %q is not one of open, closed", p.FailurePolicy)
	}
	if p.CallTimeout != "" {
		if d, err := time.ParseDuration(p.CallTimeout); err != nil || d <= 0 {
			return fmt.Errorf("callTimeout %q is not a positive duration (such as 10s)", p.CallTimeout)
		}
	}
	return nil
}

// Datapath sizes the shared BPF maps and paces their upkeep. A size
// changed under a running node carries the map's entries over into a map
// of the new size.
type Datapath struct {
	// CTMaxEntries is the conntrack map size, DefaultCTMaxEntries when
	// not set.
	CTMaxEntries uint32 `yaml:"ctMaxEntries"`
	// ServicesMaxEntries sizes weir_services: a master entry per frontend
	// (two for external frontends with externalTrafficPolicy Local) and a
	// slot per backend of each.
	ServicesMaxEntries uint32 `yaml:"servicesMaxEntries"`
	// BackendsMaxEntries sizes weir_backends and weir_backend_addrs: one
	// entry per backend address and port.
	BackendsMaxEntries uint32 `yaml:"backendsMaxEntries"`
	// RevNATMaxEntries sizes weir_revnat: one entry per frontend.
	RevNATMaxEntries uint32 `yaml:"revNATMaxEntries"`
	// AffinityMaxEntries sizes weir_affinity (LRU): one entry per client
	// and frontend with sessionAffinity ClientIP.
	AffinityMaxEntries uint32 `yaml:"affinityMaxEntries"`
	// NATMaxEntries sizes weir_nat (LRU): two entries per flow whose
	// source is translated (NodePort to remote backends, masquerade).
	NATMaxEntries uint32 `yaml:"natMaxEntries"`
	// CTGCInterval is the conntrack collector's first interval (a Go
	// duration, default 5m); it adapts between CTGCMinInterval (default
	// 10s) and CTGCMaxInterval (default 12h) to how much each pass finds.
	CTGCInterval    string `yaml:"ctGCInterval"`
	CTGCMinInterval string `yaml:"ctGCMinInterval"`
	CTGCMaxInterval string `yaml:"ctGCMaxInterval"`
}

// MapSize is one map size setting.
type MapSize struct {
	Field   string   // the setting, under datapath
	Maps    []string // the maps it sizes
	Value   uint32
	Default uint32
	Min     uint32
}

// MapSizes lists the map size settings with their values.
func (d Datapath) MapSizes() []MapSize {
	return []MapSize{
		{"ctMaxEntries", []string{"weir_ct"}, d.CTMaxEntries, DefaultCTMaxEntries, MinCTMaxEntries},
		{"servicesMaxEntries", []string{"weir_services"}, d.ServicesMaxEntries, DefaultServicesMaxEntries, MinMapEntries},
		{"backendsMaxEntries", []string{"weir_backends", "weir_backend_addrs"}, d.BackendsMaxEntries, DefaultBackendsMaxEntries, MinMapEntries},
		{"revNATMaxEntries", []string{"weir_revnat"}, d.RevNATMaxEntries, DefaultRevNATMaxEntries, MinMapEntries},
		{"affinityMaxEntries", []string{"weir_affinity"}, d.AffinityMaxEntries, DefaultAffinityMaxEntries, MinMapEntries},
		{"natMaxEntries", []string{"weir_nat"}, d.NATMaxEntries, DefaultNATMaxEntries, MinMapEntries},
	}
}

// MaxEntries are the sizes of the maps, by map name.
func (d Datapath) MaxEntries() map[string]uint32 {
	out := map[string]uint32{}
	for _, s := range d.MapSizes() {
		for _, m := range s.Maps {
			out[m] = s.Value
		}
	}
	return out
}

// Defaults of the conntrack collector's intervals.
const (
	DefaultCTGCInterval    = 5 * time.Minute
	DefaultCTGCMinInterval = 10 * time.Second
	DefaultCTGCMaxInterval = 12 * time.Hour
)

// GCIntervals returns the collector's intervals with their defaults, or
// which field is wrong.
func (d Datapath) GCIntervals() (interval, lo, hi time.Duration, field string, err error) {
	parse := func(s string, def time.Duration) (time.Duration, error) {
		if s == "" {
			return def, nil
		}
		v, err := time.ParseDuration(s)
		if err != nil {
			return 0, fmt.Errorf("%q is not a duration (such as 30s, 5m, 1h)", s)
		}
		if v < time.Second {
			return 0, fmt.Errorf("%s is shorter than the allowed 1s", v)
		}
		return v, nil
	}
	if interval, err = parse(d.CTGCInterval, DefaultCTGCInterval); err != nil {
		return 0, 0, 0, "ctGCInterval", err
	}
	if lo, err = parse(d.CTGCMinInterval, min(DefaultCTGCMinInterval, interval)); err != nil {
		return 0, 0, 0, "ctGCMinInterval", err
	}
	if hi, err = parse(d.CTGCMaxInterval, max(DefaultCTGCMaxInterval, interval)); err != nil {
		return 0, 0, 0, "ctGCMaxInterval", err
	}
	if lo > interval || interval > hi {
		return 0, 0, 0, "ctGCInterval", fmt.Errorf("%s is not between ctGCMinInterval %s and ctGCMaxInterval %s", interval, lo, hi)
	}
	return interval, lo, hi, "", nil
}

// NodePool changes the module set and settings for the nodes its selector
// matches. The first matching pool in file order applies.
type NodePool struct {
	Name         string      `yaml:"name"`
	NodeSelector Selector    `yaml:"nodeSelector"`
	Modules      PoolModules `yaml:"modules"`
	// Settings sections are deep-merged over the top-level section of the
	// same module.
	Settings map[string]yaml.Node `yaml:"settings"`
}

// PoolModules adds modules to, or removes them from, the top-level set.
type PoolModules struct {
	Enable  []string `yaml:"enable"`
	Disable []string `yaml:"disable"`
}

// Config is a loaded, fully validated configuration.
type Config struct {
	// Path is the file the configuration came from, as given to Load or
	// Parse.
	Path string
	File File

	top   *Effective
	pools []*Effective // parallel to File.NodePools
}

// Effective is what one node runs: the module set and settings after its
// pool, if any, has been applied.
type Effective struct {
	// Pool is the name of the pool that applied, "" when none matched and
	// the top-level set applies.
	Pool string
	// Modules are in start order, as module.Check returns them.
	Modules []module.Factory
	// Settings holds decoded, validated settings for every module in
	// Modules that has a settings type; modules without a section get
	// their defaults.
	Settings map[string]module.Settings
	Datapath Datapath
}

// Load reads and validates the configuration file at path.
func Load(path string, cat module.Catalog) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	return Parse(path, data, cat)
}

// Parse validates the configuration in data, which came from path. Every
// error it returns is a *strictyaml.Error naming the file, the field path
// and, when known, the line.
func Parse(path string, data []byte, cat module.Catalog) (*Config, error) {
	if cat == nil {
		return nil, &strictyaml.Error{File: path, Msg: "no module catalog to check the configuration against"}
	}
	root, err := strictyaml.Parse(path, data)
	if err != nil {
		return nil, err
	}
	f := File{Datapath: Datapath{CTMaxEntries: DefaultCTMaxEntries, ServicesMaxEntries: DefaultServicesMaxEntries,
		BackendsMaxEntries: DefaultBackendsMaxEntries, RevNATMaxEntries: DefaultRevNATMaxEntries, AffinityMaxEntries: DefaultAffinityMaxEntries,
		NATMaxEntries: DefaultNATMaxEntries}}
	if err := strictyaml.DecodeNode(path, root, "", &f); err != nil {
		return nil, err
	}
	b := &builder{file: path, cat: cat, root: root, f: &f}
	top, pools, err := b.build()
	if err != nil {
		return nil, err
	}
	return &Config{Path: path, File: f, top: top, pools: pools}, nil
}

// Resolve picks the pool for a node with the given labels (the first pool
// whose selector matches, or none) and returns what that node runs. The
// result is the node's own copy of the lists; the Settings values are
// shared.
func (c *Config) Resolve(labels map[string]string) (*Effective, error) {
	if c == nil || c.top == nil || len(c.pools) != len(c.File.NodePools) {
		return nil, fmt.Errorf("config: Resolve on a configuration that did not come from Load or Parse")
	}
	for i, p := range c.File.NodePools {
		if p.NodeSelector.Matches(labels) {
			return c.pools[i].clone(), nil
		}
	}
	return c.top.clone(), nil
}

func (e *Effective) clone() *Effective {
	c := *e
	c.Modules = slices.Clone(e.Modules)
	c.Settings = maps.Clone(e.Settings)
	return &c
}
