// Package pluginv1 is the generated code of plugin.proto, the protocol
// between weir-agent and datapath plugins (version 1).
package pluginv1

//go:generate sh -c "protoc --plugin=protoc-gen-go=$(go tool -n protoc-gen-go) --plugin=protoc-gen-go-grpc=$(go tool -n protoc-gen-go-grpc) --go_out=paths=source_relative:. --go-grpc_out=paths=source_relative:. plugin.proto"
