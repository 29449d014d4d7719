package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"

	"github.com/weirnet/weir/core/lab"
)

// labKube runs "weir lab kube apply|delete NAME -f FILE": the lab's own
// small kubectl for Namespaces, Pods and Services.
func labKube(args []string, out io.Writer) error {
	if len(args) == 0 || (args[0] != "apply" && args[0] != "delete") {
		return fmt.Errorf("lab kube needs apply or delete; %w", errUsage)
	}
	verb := args[0]
	fs := flag.NewFlagSet("lab kube "+verb, flag.ContinueOnError)
	file := fs.String("f", "", "manifest file (YAML, several documents)")
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return err
	}
	if len(pos) != 1 || *file == "" {
		return fmt.Errorf("lab kube %s needs the lab's name and -f FILE", verb)
	}
	l, err := lab.Load(pos[0], lab.Options{})
	if err != nil {
		return err
	}
	c, err := l.Kube()
	if err != nil {
		return err
	}
	data, err := os.ReadFile(*file)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rd := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	for i := 0; ; i++ {
		doc, err := rd.Read()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%s: document %d: %w", *file, i+1, err)
		}
		if len(bytes.TrimSpace(doc)) == 0 {
			continue
		}
		obj, gvk, err := scheme.Codecs.UniversalDeserializer().Decode(doc, nil, nil)
		if err != nil {
			return fmt.Errorf("%s: document %d: %w", *file, i+1, err)
		}
		msg, err := applyOne(ctx, c, verb, obj)
		if err != nil {
			return fmt.Errorf("%s: document %d (%s): %w", *file, i+1, gvk.Kind, err)
		}
		fmt.Fprintln(out, msg)
	}
}

func applyOne(ctx context.Context, c kubernetes.Interface, verb string, obj any) (string, error) {
	del := verb == "delete"
	ignore := func(err error) error {
		if apierrors.IsAlreadyExists(err) || del && apierrors.IsNotFound(err) {
			return nil
		}
		return err
	}
	switch o := obj.(type) {
	case *corev1.Namespace:
		if del {
			return "namespace/" + o.Name + " deleted", ignore(c.CoreV1().Namespaces().Delete(ctx, o.Name, metav1.DeleteOptions{}))
		}
		_, err := c.CoreV1().Namespaces().Create(ctx, o, metav1.CreateOptions{})
		return "namespace/" + o.Name + " created", ignore(err)
	case *corev1.Pod:
		ns := nsOf(o.Namespace)
		if del {
			return "pod/" + o.Name + " deleted", ignore(c.CoreV1().Pods(ns).Delete(ctx, o.Name, metav1.DeleteOptions{}))
		}
		_, err := c.CoreV1().Pods(ns).Create(ctx, o, metav1.CreateOptions{})
		return "pod/" + o.Name + " created", ignore(err)
	case *corev1.Service:
		ns := nsOf(o.Namespace)
		if del {
			return "service/" + o.Name + " deleted", ignore(c.CoreV1().Services(ns).Delete(ctx, o.Name, metav1.DeleteOptions{}))
		}
		created, err := c.CoreV1().Services(ns).Create(ctx, o, metav1.CreateOptions{})
		if err != nil {
			return "", ignore(err)
		}
		return "service/" + o.Name + " created with ClusterIP " + created.Spec.ClusterIP, nil
	}
	return "", fmt.Errorf("kind %T is not supported here (Namespace, Pod, Service)", obj)
}

func nsOf(ns string) string {
	if ns == "" {
		return "default"
	}
	return ns
}
