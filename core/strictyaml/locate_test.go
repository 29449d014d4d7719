package strictyaml

import "testing"

func TestLocate(t *testing.T) {
	doc := []byte(`services:
  - name: web
    ports:
      - port: 80
      - port: 0
labels:
  node.weir.dev/pool: edge
`)
	root, err := Parse("f.yaml", doc)
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]int{
		Key(Index(Key(Index("services", 0), "ports"), 1), "port"): 5,
		Key(Index("services", 0), "name"):                         2,
		Key("labels", "node.weir.dev/pool"):                       7,
		// Missing pieces: the deepest node that exists.
		Key(Index("services", 0), "clusterIP"): 2,
		Index("services", 9):                   2,
	}
	for path, line := range cases {
		n := Locate(root, path)
		if n == nil || n.Line != line {
			got := 0
			if n != nil {
				got = n.Line
			}
			t.Errorf("Locate(%s) at line %d, want %d", path, got, line)
		}
	}
	if !Present(root, Key(Index("services", 0), "name")) || Present(root, Key(Index("services", 0), "clusterIP")) || Present(root, Index("services", 9)) {
		t.Error("Present disagrees with the document")
	}
	if Locate(nil, "x") != nil || Present(nil, "x") {
		t.Error("Locate on a nil root returned a node")
	}
}
