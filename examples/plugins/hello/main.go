package main

import (
	"context"
	"encoding/json"

	"github.com/weirnet/weir/plugins/sdk"
)

func main() { sdk.Serve(&hello{}) }

type hello struct{}

func (hello) Describe() sdk.Description {
	return sdk.Description{
		Name: "hello", Version: "0.1.0", Summary: "counts the SYNs pods send",
		Slots: []sdk.SlotClaim{{Slot: "pod-egress/plugin-early", Program: "hello"}},
		Maps:  []sdk.OwnMap{{Name: "hello_syns", Summary: "SYNs seen"}},
	}
}

// Configure validates settings (JSON) and returns the object. Return an
// *sdk.FieldError to point at a field.
func (hello) Configure(json.RawMessage) (*sdk.Object, error) {
	return &sdk.Object{ELF: _HelloBytes}, nil
}

// Start runs once the agent loaded the object, and again after it
// restarted your crashed process: write your maps' state here.
func (hello) Start(context.Context, *sdk.Host, json.RawMessage) error { return nil }

func (hello) Stop(context.Context) error { return nil }
