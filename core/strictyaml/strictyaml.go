// Package strictyaml decodes YAML into Go structs the strict way a
// configuration file deserves: unknown and duplicate keys are errors, numbers
// must fit their field, and every error carries the file, line, column and
// field path of the value to fix.
//
// It walks the yaml.v3 node tree itself instead of using yaml.Unmarshal,
// because yaml.v3 neither reports field paths nor rejects duplicate keys
// when decoding into structs, and its KnownFields mode stops at the first
// error with a message that names Go types rather than config fields.
package strictyaml

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"

	"gopkg.in/yaml.v3"
)

// Error is a decoding or validation error located in a YAML document.
type Error struct {
	File string
	// Line and Column are 1-based; zero when unknown.
	Line, Column int
	// Path is the dotted field path, e.g. "nodePools[1].settings.tunnel".
	Path string
	Msg  string
}

// Error formats as "FILE:LINE:COL: PATH: MSG", leaving out empty parts.
func (e *Error) Error() string {
	var loc []string
	if e.File != "" {
		loc = append(loc, e.File)
	}
	if e.Line > 0 {
		loc = append(loc, strconv.Itoa(e.Line))
		if e.Column > 0 {
			loc = append(loc, strconv.Itoa(e.Column))
		}
	}
	var parts []string
	for _, p := range []string{strings.Join(loc, ":"), e.Path, e.Msg} {
		if p != "" {
			parts = append(parts, p)
		}
	}
	return strings.Join(parts, ": ")
}

// At returns an Error located at node n (which may be nil when no position
// is known).
func At(file string, n *yaml.Node, path, msg string) *Error {
	e := &Error{File: file, Path: path, Msg: msg}
	if n != nil {
		e.Line, e.Column = n.Line, n.Column
	}
	return e
}

// Key returns the path of the field or map key name below path. Keys that
// would make the dotted form ambiguous (label keys such as
// "node.weir.dev/pool") are written in brackets, quoted.
func Key(path, name string) string {
	if name == "" || strings.ContainsAny(name, ".[]\" \t") {
		return path + "[" + strconv.Quote(name) + "]"
	}
	if path == "" {
		return name
	}
	return path + "." + name
}

// Index returns the path of list item i below path.
func Index(path string, i int) string {
	return path + "[" + strconv.Itoa(i) + "]"
}

// Parse parses one YAML document and returns its root node, or nil when the
// document is empty. Syntax errors become an *Error with the line yaml.v3
// reports.
func Parse(file string, data []byte) (*yaml.Node, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, syntaxError(file, data, err)
	}
	// A second document would otherwise be ignored without a word, and
	// whatever the user put there would silently not apply.
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case errors.Is(err, io.EOF):
	case err != nil:
		return nil, syntaxError(file, data, err)
	case !isEmptyDocument(&next):
		return nil, At(file, &next, "", "a second YAML document starts here; the file must hold exactly one")
	}
	root := docRoot(&doc)
	if root == nil || isNull(root) {
		return nil, nil
	}
	return root, nil
}

// yamlLine matches yaml.v3's syntax error text, "yaml: line N: reason".
var yamlLine = regexp.MustCompile(`(?s)^yaml: line (\d+): (.*)$`)

// parserProblems are the messages of yaml.v3's parser (as opposed to its
// scanner). yaml.v3 v3.0.1 reports their line 0-based, while scanner errors
// come 1-based; both leave the line out when it is the first one.
var parserProblems = []string{
	"did not find expected ',' or ']'",
	"did not find expected ',' or '}'",
	"did not find expected '-' indicator",
	"did not find expected <document start>",
	"did not find expected <stream-start>",
	"did not find expected key",
	"did not find expected node content",
	"found duplicate %TAG directive",
	"found duplicate %YAML directive",
	"found incompatible YAML document",
	"found undefined tag handle",
}

// positionless are the starts of yaml.v3 errors that never carry a line
// (bad encoding, read errors, unknown anchors), so a missing line there
// does not mean line 1.
var positionless = []string{
	"control characters", "expected low surrogate", "incomplete UTF", "input error",
	"invalid Unicode", "invalid leading UTF", "invalid length of a UTF", "invalid trailing UTF",
	"unexpected low surrogate", "unknown anchor", "attempted to go past",
}

func syntaxError(file string, data []byte, err error) *Error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	line := 0
	if m := yamlLine.FindStringSubmatch(err.Error()); m != nil {
		line, _ = strconv.Atoi(m[1])
		msg = m[2]
		if slices.Contains(parserProblems, msg) {
			line++
		}
	} else if !slices.ContainsFunc(positionless, func(p string) bool { return strings.HasPrefix(msg, p) }) {
		line = 1
	}
	// Errors found at the end of the stream are placed on the line after
	// the last one; point at the last line the user can see instead.
	if last := lastLine(data); line > last {
		line = last
	}
	return &Error{File: file, Line: line, Msg: "not valid YAML: " + msg}
}

// lastLine is the number of the last line of data (0 for empty data).
func lastLine(data []byte) int {
	n := bytes.Count(data, []byte("\n"))
	if len(data) > 0 && data[len(data)-1] != '\n' {
		n++
	}
	return n
}

// Decode parses data as one YAML document and decodes it strictly into
// out, which must be a non-nil pointer. An empty document leaves out as it
// was, so callers may fill in defaults first.
func Decode(file string, data []byte, out any) error {
	root, err := Parse(file, data)
	if err != nil {
		return err
	}
	return DecodeNode(file, root, "", out)
}

// DecodeNode decodes the subtree node, which sits at path in file, strictly
// into out, a non-nil pointer. A nil node or a null value leaves out as it
// was.
func DecodeNode(file string, node *yaml.Node, path string, out any) error {
	rv := reflect.ValueOf(out)
	if !rv.IsValid() || rv.Kind() != reflect.Pointer || rv.IsNil() {
		return &Error{File: file, Path: path, Msg: fmt.Sprintf("cannot decode into %T: need a non-nil pointer", out)}
	}
	if node == nil {
		return nil
	}
	d := decoder{file: file}
	return d.decode(node, path, rv.Elem())
}

var (
	nodeType    = reflect.TypeFor[yaml.Node]()
	nodePtrType = reflect.TypeFor[*yaml.Node]()
)

type decoder struct {
	file string
}

func (d *decoder) fail(n *yaml.Node, path, format string, args ...any) error {
	return At(d.file, n, path, fmt.Sprintf(format, args...))
}

func (d *decoder) decode(n *yaml.Node, path string, v reflect.Value) error {
	if n.Kind == yaml.DocumentNode {
		if n = docRoot(n); n == nil {
			return nil
		}
	}
	// Raw nodes are kept as written, null included, because whoever
	// decodes them later needs their position.
	switch v.Type() {
	case nodeType:
		v.Set(reflect.ValueOf(*n))
		return nil
	case nodePtrType:
		c := *n
		v.Set(reflect.ValueOf(&c))
		return nil
	}
	if n.Kind == yaml.AliasNode {
		// Following aliases would let a few lines expand into an
		// exponential amount of work, and anchors can even form cycles.
		return d.fail(n, path, "aliases (*%s) are not supported; write the value out", n.Value)
	}
	if isNull(n) {
		return nil
	}
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
		}
		return d.decode(n, path, v.Elem())
	case reflect.Struct:
		return d.decodeStruct(n, path, v)
	case reflect.Map:
		return d.decodeMap(n, path, v)
	case reflect.Slice:
		return d.decodeSlice(n, path, v)
	case reflect.String:
		if err := d.expect(n, path, yaml.ScalarNode); err != nil {
			return err
		}
		v.SetString(n.Value)
		return nil
	case reflect.Bool:
		return d.decodeBool(n, path, v)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return d.decodeInt(n, path, v)
	case reflect.Float32, reflect.Float64:
		return d.decodeFloat(n, path, v)
	}
	return d.fail(n, path, "cannot decode into Go type %s", v.Type())
}

func (d *decoder) expect(n *yaml.Node, path string, kind yaml.Kind) error {
	if n.Kind == kind {
		return nil
	}
	return d.fail(n, path, "expected %s, found %s", kindName(kind), describe(n))
}

// pairs checks a mapping's keys (scalars, no merge keys, no duplicates)
// and calls fn for each key and value in document order.
func (d *decoder) pairs(n *yaml.Node, path string, fn func(k, v *yaml.Node) error) error {
	if err := d.expect(n, path, yaml.MappingNode); err != nil {
		return err
	}
	// Mappings are small but many (one per service, port and backend):
	// earlier keys are looked through rather than put in a map, unless
	// there are many.
	var seen map[string]*yaml.Node
	if len(n.Content) > 32 {
		seen = map[string]*yaml.Node{}
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			return d.fail(k, path, "expected a scalar key, found %s", describe(k))
		}
		if k.ShortTag() == "!!merge" {
			return d.fail(k, path, "merge keys (<<) are not supported; write the fields out")
		}
		var first *yaml.Node
		if seen != nil {
			first = seen[k.Value]
			seen[k.Value] = k
		} else {
			for j := 0; j < i; j += 2 {
				if n.Content[j].Value == k.Value {
					first = n.Content[j]
					break
				}
			}
		}
		if first != nil {
			return d.fail(k, path, "duplicate key %q (first at line %d)", k.Value, first.Line)
		}
		if err := fn(k, v); err != nil {
			return err
		}
	}
	return nil
}

func (d *decoder) decodeStruct(n *yaml.Node, path string, v reflect.Value) error {
	fields, names := structFields(v.Type())
	return d.pairs(n, path, func(k, val *yaml.Node) error {
		i, ok := fields[k.Value]
		if !ok {
			if len(names) == 0 {
				return d.fail(k, path, "unknown field %q; this section takes no fields", k.Value)
			}
			return d.fail(k, path, "unknown field %q; allowed fields: %s", k.Value, strings.Join(names, ", "))
		}
		return d.decode(val, Key(path, k.Value), v.Field(i))
	})
}

// fieldsOf caches structFields by type: a file of ten thousand services
// decodes the same few structs a hundred thousand times.
var fieldsOf sync.Map // reflect.Type -> structInfo

type structInfo struct {
	fields map[string]int
	names  []string
}

// structFields maps a struct's YAML keys to field indexes, and lists the
// keys sorted. The results are shared: callers must not change them.
func structFields(t reflect.Type) (map[string]int, []string) {
	if si, ok := fieldsOf.Load(t); ok {
		return si.(structInfo).fields, si.(structInfo).names
	}
	fields, names := computeFields(t)
	fieldsOf.Store(t, structInfo{fields, names})
	return fields, names
}

func computeFields(t reflect.Type) (map[string]int, []string) {
	fields := map[string]int{}
	var names []string
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag := f.Tag.Get("yaml")
		if tag == "-" {
			continue
		}
		name, _, _ := strings.Cut(tag, ",")
		if name == "" {
			name = strings.ToLower(f.Name) // yaml.v3's rule for untagged fields
		}
		if _, dup := fields[name]; dup {
			continue
		}
		fields[name] = i
		names = append(names, name)
	}
	slices.Sort(names)
	return fields, names
}

func (d *decoder) decodeMap(n *yaml.Node, path string, v reflect.Value) error {
	t := v.Type()
	if t.Key().Kind() != reflect.String {
		return d.fail(n, path, "cannot decode into Go type %s: map keys must be strings", t)
	}
	if err := d.expect(n, path, yaml.MappingNode); err != nil {
		return err
	}
	if v.IsNil() {
		v.Set(reflect.MakeMap(t))
	}
	return d.pairs(n, path, func(k, val *yaml.Node) error {
		elem := reflect.New(t.Elem()).Elem()
		if err := d.decode(val, Key(path, k.Value), elem); err != nil {
			return err
		}
		v.SetMapIndex(reflect.ValueOf(k.Value).Convert(t.Key()), elem)
		return nil
	})
}

func (d *decoder) decodeSlice(n *yaml.Node, path string, v reflect.Value) error {
	if err := d.expect(n, path, yaml.SequenceNode); err != nil {
		return err
	}
	s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
	for i, item := range n.Content {
		if err := d.decode(item, Index(path, i), s.Index(i)); err != nil {
			return err
		}
	}
	v.Set(s)
	return nil
}

func (d *decoder) decodeBool(n *yaml.Node, path string, v reflect.Value) error {
	if err := d.expect(n, path, yaml.ScalarNode); err != nil {
		return err
	}
	// Only the two YAML 1.2 spellings: "yes", "on" or "True" are far more
	// often a mistake than a choice.
	if !quoted(n) && (n.Value == "true" || n.Value == "false") {
		v.SetBool(n.Value == "true")
		return nil
	}
	return d.fail(n, path, "%s; use true or false", notA(n, "a boolean"))
}

func (d *decoder) decodeInt(n *yaml.Node, path string, v reflect.Value) error {
	if err := d.expect(n, path, yaml.ScalarNode); err != nil {
		return err
	}
	x, ok := parseInteger(n.Value)
	if !ok || quoted(n) {
		return d.fail(n, path, "%s", notA(n, "an integer"))
	}
	lo, hi := intRange(v)
	if x.Cmp(lo) < 0 || x.Cmp(hi) > 0 {
		return d.fail(n, path, "%s is out of range (%s to %s)", n.Value, lo, hi)
	}
	if v.CanInt() {
		v.SetInt(x.Int64())
	} else {
		v.SetUint(x.Uint64())
	}
	return nil
}

func (d *decoder) decodeFloat(n *yaml.Node, path string, v reflect.Value) error {
	if err := d.expect(n, path, yaml.ScalarNode); err != nil {
		return err
	}
	f, err := parseFloat(n.Value, v.Type().Bits())
	if quoted(n) || (err != nil && !errors.Is(err, strconv.ErrRange)) {
		return d.fail(n, path, "%s", notA(n, "a number"))
	}
	if err != nil {
		return d.fail(n, path, "%s is out of range for a %d-bit float", n.Value, v.Type().Bits())
	}
	v.SetFloat(f)
	return nil
}

// parseFloat accepts Go's float syntax plus YAML's .inf and .nan.
func parseFloat(s string, bits int) (float64, error) {
	switch strings.ToLower(s) {
	case ".inf", "+.inf":
		s = "+Inf"
	case "-.inf":
		s = "-Inf"
	case ".nan":
		s = "NaN"
	}
	return strconv.ParseFloat(s, bits)
}

func notA(n *yaml.Node, what string) string {
	if quoted(n) {
		return fmt.Sprintf("%q is a quoted string, not %s", n.Value, what)
	}
	return fmt.Sprintf("%q is not %s", n.Value, what)
}

func quoted(n *yaml.Node) bool {
	return n.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle) != 0
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func isEmptyDocument(doc *yaml.Node) bool {
	root := docRoot(doc)
	return root == nil || isNull(root)
}

func docRoot(doc *yaml.Node) *yaml.Node {
	if doc.Kind != yaml.DocumentNode {
		return doc
	}
	if len(doc.Content) == 0 {
		return nil
	}
	return doc.Content[0]
}

func kindName(k yaml.Kind) string {
	switch k {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a sequence"
	case yaml.ScalarNode:
		return "a scalar"
	case yaml.AliasNode:
		return "an alias"
	case yaml.DocumentNode:
		return "a document"
	}
	return "nothing"
}

func describe(n *yaml.Node) string {
	if n.Kind == yaml.ScalarNode {
		return fmt.Sprintf("the scalar %q", n.Value)
	}
	return kindName(n.Kind)
}
