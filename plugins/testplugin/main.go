// Command testplugin is a datapath plugin that misbehaves on purpose, as
// WEIR_TESTPLUGIN_MODE says, for the host's tests (core/pluginhost):
//
//	good            claims pod-egress/plugin-early with a program that passes
//	verifier        ... with a program the verifier refuses
//	undeclared-map  ... with a program using weir_nat, not declared
//	in-tree-slot    claims pod-egress/lb
//	hang            never answers Describe
//	hang-start      never answers Start
//	version2        speaks protocol version 2
//	exit            exits before the handshake
//	bad-settings    refuses every settings section
//	exit-after-start  exits a moment after Start (a crash)
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/hashicorp/go-plugin"

	"github.com/weirnet/weir/plugins/sdk"
)

// ModeEnv selects the behaviour.
const ModeEnv = "WEIR_TESTPLUGIN_MODE"

func main() {
	mode := os.Getenv(ModeEnv)
	switch mode {
	case "exit":
		fmt.Fprintln(os.Stderr, "testplugin: exiting at once, as asked")
		os.Exit(3)
	case "version2":
		plugin.Serve(&plugin.ServeConfig{
			HandshakeConfig:  plugin.HandshakeConfig{ProtocolVersion: 2, MagicCookieKey: sdk.Handshake.MagicCookieKey, MagicCookieValue: sdk.Handshake.MagicCookieValue},
			VersionedPlugins: map[int]plugin.PluginSet{2: {sdk.PluginKey: &sdk.GRPCPlugin{Impl: &testPlugin{mode: mode}}}},
			GRPCServer:       plugin.DefaultGRPCServer,
		})
		return
	}
	sdk.Serve(&testPlugin{mode: mode})
}

type testPlugin struct{ mode string }

func (p *testPlugin) Describe() sdk.Description {
	d := sdk.Description{Name: "testplugin", Version: "0.0.1", Summary: "misbehaves on purpose",
		Slots: []sdk.SlotClaim{{Slot: "pod-egress/plugin-early", Program: "pass_stage"}}}
	switch p.mode {
	case "hang":
		select {}
	case "verifier":
		d.Slots[0].Program = "rejected"
	case "undeclared-map":
		d.Slots[0].Program = "uses_nat"
	case "in-tree-slot":
		d.Slots[0].Slot = "pod-egress/lb"
	}
	return d
}

func (p *testPlugin) Configure(raw json.RawMessage) (*sdk.Object, error) {
	if p.mode == "bad-settings" {
		return nil, &sdk.FieldError{Path: "speed", Msg: "must be slow"}
	}
	return &sdk.Object{ELF: _TestpluginBytes}, nil
}

func (p *testPlugin) Start(context.Context, *sdk.Host, json.RawMessage) error {
	switch p.mode {
	case "hang-start":
		select {}
	case "exit-after-start":
		go func() {
			time.Sleep(100 * time.Millisecond)
			os.Exit(4)
		}()
	}
	return nil
}

func (p *testPlugin) Stop(context.Context) error { return nil }
